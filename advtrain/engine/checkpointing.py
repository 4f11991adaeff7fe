"""A run's checkpoint policy: what it resumes from (and the checks that a checkpoint fits), what it writes and where
(last.pt, best.pt), and what the newest checkpoint on disk is, for the messages of a failed write or a stop.

Every rank takes part in a save (per-rank RNG, method state and pass counts are gathered to rank 0, which alone
writes), and none moves on before the file is on disk.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

from omegaconf import OmegaConf

from advtrain.engine.atomic import is_disk_full, remove_stale_temps
from advtrain.engine.checkpoint import load_checkpoint, save_checkpoint
from advtrain.engine.distributed import Dist
from advtrain.engine.loop import LoopState
from advtrain.engine.precision import set_rng_state
from advtrain.engine.results import eval_settings
from advtrain.errors import CheckpointError
from advtrain.methods import method_defaults
from advtrain.schema import trajectory_keys


class Checkpoints:
    def __init__(self, run_dir: Path, dist: Dist):
        self.last_path = run_dir / "checkpoints" / "last.pt"
        self.best_path = self.last_path.with_name("best.pt")
        self.results_path = run_dir / "results.json"
        self.run_dir, self.dist = run_dir, dist
        self.newest: str | None = None  # the newest checkpoint on disk, described: "<path> (after epoch 3)"

    def remove_stale(self) -> list[Path]:
        """Temporary files of writes a kill interrupted (the run directory is held: nothing else writes here)."""
        return remove_stale_temps(self.run_dir, self.last_path.parent) if self.dist.is_main else []

    # --- resuming ------------------------------------------------------------------------------------------------
    def resume_state(self, cfg) -> dict | None:
        """The checkpoint this run continues from (resume=auto|PATH), checked against the run, or None."""
        if cfg.resume in (None, "never"):
            return None
        path = self.last_path if cfg.resume == "auto" else Path(cfg.resume)
        if cfg.resume == "auto" and not path.exists():
            return None
        try:
            state = load_checkpoint(path)
        except CheckpointError as e:
            if cfg.resume != "auto":
                raise
            raise CheckpointError(f"{e}; to start this run over instead, rerun with resume=never (its checkpoint "
                                  "is then replaced)") from None
        world_size = self.dist.world_size
        written_by = int(state.get("world_size", 1))
        if written_by != world_size and not state["loop"]["finished"]:
            # Each rank's RNG stream and method state (FREE's perturbations, ...) belong to its shard of the data.
            raise CheckpointError(f"cannot resume from {path}: it was written by {written_by} process(es), this run "
                                  f"has {world_size}; resume with trainer.devices={written_by}")
        saved = OmegaConf.create(state["config"])
        for key in trajectory_keys():  # the schema marks them: a checkpoint resumes only where they all agree
            ours, theirs = _plain(OmegaConf.select(cfg, key)), _plain(OmegaConf.select(saved, key))
            if key == "method" and isinstance(ours, dict) and isinstance(theirs, dict):
                theirs = {**{k: v for k, v in method_defaults(ours).items() if k in ours}, **theirs}
            if ours != theirs:
                name, theirs, ours = _first_difference(key, theirs, ours)
                raise CheckpointError(f"cannot resume from {path}: it was trained with {name}={theirs}, this "
                                      f"run has {name}={ours}; use a new run directory or resume=never")
        self.newest = describe(path, state["loop"])
        return state

    def finished(self, state: dict | None, cfg) -> dict | None:
        """results.json of a run that is done (trained, and evaluated as this config asks), else None."""
        if state is None or not state["loop"]["finished"]:
            return None
        try:
            results = json.loads(self.results_path.read_text())
        except (OSError, ValueError):
            return None
        return results if results.get("eval_settings") == eval_settings(cfg) else None

    @staticmethod
    def restore(state, model, optimizer, scaler, method, loader, counter, loop: LoopState, rank: int) -> None:
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"checkpoint does not match this model: {str(e).splitlines()[0][:200]}") from None
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        ranks = state.get("ranks") or []
        mine = ranks[rank] if rank < len(ranks) else state  # a finished run re-evaluated on another world size
        method.load_state_dict(mine["method"])
        loader.load_state_dict(state["loader"])
        counter.load_state_dict(mine["counter"])
        for k, v in state["loop"].items():
            setattr(loop, k, v)
        set_rng_state(mine["rng"])

    # --- writing -------------------------------------------------------------------------------------------------
    def save(self, loop: LoopState, gather: Callable[[], dict], build: Callable[[LoopState, list], dict],
             path: Path | None = None) -> str:
        """Write a checkpoint of the run at `loop`. `gather()` is this rank's own state (method, RNG, pass count),
        collected from every rank; `build(loop, ranks)` makes the checkpoint dict on rank 0."""
        path = path or self.last_path
        ranks = self.dist.gather(gather())
        if self.dist.is_main:
            checkpoint = build(loop, ranks)
            with self.reporting_full_disk(path):
                save_checkpoint(checkpoint, path)
            if path == self.last_path:
                self.newest = describe(path, checkpoint["loop"])
        self.dist.barrier()  # no rank moves on (or exits) before the checkpoint is on disk
        return str(path)

    @contextmanager
    def reporting_full_disk(self, path: Path):
        """A full disk is the user's to fix: one line that says so and what is kept, not torch's zip-writer
        traceback."""
        try:
            yield
        except Exception as e:
            if not is_disk_full(e):
                raise
            kept = f"the checkpoint {self.newest} is kept" if self.newest else "no earlier checkpoint exists"
            raise CheckpointError(f"no space left on device writing {path}; {kept}") from None


def describe(path: Path, loop: dict[str, Any]) -> str:
    where = f"epoch {loop['epoch'] + 1}, batch {loop['batch']}" if loop["batch"] else f"after epoch {loop['epoch']}"
    return f"{path} ({'finished' if loop.get('finished') else where})"


def _first_difference(key: str, theirs, ours) -> tuple[str, Any, Any]:
    """The first key where two sections differ ("method.adv_weight"), with both values; the section itself where
    it is no mapping or the method differs."""
    if isinstance(theirs, dict) and isinstance(ours, dict) and theirs.get("name") == ours.get("name"):
        for k in [*ours, *(k for k in theirs if k not in ours)]:
            if ours.get(k, "<absent>") != theirs.get(k, "<absent>"):
                return f"{key}.{k}", theirs.get(k, "<absent>"), ours.get(k, "<absent>")
    return key, theirs, ours


def _plain(value):
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
