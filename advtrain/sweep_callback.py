"""The end of a multirun: the sweep's folder, what its jobs left there, and the command that compares them.

    sweep folder: multirun/natural-pgd__seed0-1-8456b348 (4 jobs: 4 finished)
    compare the runs: advtrain-report multirun/natural-pgd__seed0-1-8456b348

A Hydra callback (train.yaml's hydra.callbacks), so every launcher gets it: Hydra calls on_multirun_end in the
process that started the sweep once all jobs have returned, after submitit's jobs (local or SLURM) and joblib's
workers too. Hydra skips it when a job fails: the sweep then ends with that job's error.
"""
from __future__ import annotations

import os
import shlex
from collections import Counter
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

RESULTS = "results.json"
STATES = ("finished", "running in another process", "without results")


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        for line in summary_lines(Path(str(config.hydra.sweep.dir))):
            print(line, flush=True)


def summary_lines(sweep_dir: Path) -> list[str]:
    shown = _shown(sweep_dir)
    return [f"sweep folder: {shown} ({_counts(job_states(sweep_dir))})",
            f"compare the runs: advtrain-report {shlex.quote(shown)}"]


def job_states(sweep_dir: Path) -> Counter:
    """How many run folders below `sweep_dir` are in each of STATES. A run folder is one a job held (its `.lock`)
    or finished in: any hydra.sweep.subdir, nested or not, is found; Hydra's and joblib's dot-folders hold neither."""
    from advtrain.engine.rundir import LOCK_NAME

    folders = {p.parent for name in (LOCK_NAME, RESULTS) for p in sweep_dir.rglob(name)} if sweep_dir.is_dir() else ()
    return Counter(_state(folder) for folder in folders)


def _state(run_dir: Path) -> str:
    from advtrain.engine.rundir import is_held_elsewhere

    if (run_dir / RESULTS).is_file():
        return "finished"
    # A rerun skips the jobs another process still holds (a second terminal, a resubmitted array).
    return "running in another process" if is_held_elsewhere(run_dir) else "without results"


def _counts(states: Counter) -> str:
    total = sum(states.values())
    if not total:
        return "no jobs"
    parts = ", ".join(f"{states[s]} {s}" for s in STATES if states[s])
    return f"{total} job{'s' * (total != 1)}: {parts}"


def _shown(sweep_dir: Path) -> str:
    """The folder as the user can type it here: relative when it lies below the working directory."""
    path = Path(os.path.abspath(sweep_dir))
    cwd = Path.cwd()
    return str(path.relative_to(cwd)) if cwd in path.parents else str(sweep_dir)
