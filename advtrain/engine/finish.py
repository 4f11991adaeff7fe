"""The end of a run, the same for training and for advtrain-eval: the final evaluation (kept batch by batch, so a
stopped one goes on from its last batch), then results.json, written atomically, and the table on the console.

A full disk on the way is one line: the evaluation's progress so far (or the checkpoint) is kept for the rerun.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from torch import nn

from advtrain.engine.checkpoint import RunCheckpoints
from advtrain.engine.distributed import SINGLE, Dist
from advtrain.engine.eval_progress import progress_path
from advtrain.engine.evaluate import View, evaluate_views
from advtrain.engine.results import write_results
from advtrain.logging import console as con


def _say(line: str) -> None:
    con.console.print(line, markup=False)


def final_evaluation(model: nn.Module, testset, suite: Mapping[str, Mapping], eval_cfg, views: Sequence[View], *,
                     ckpts: RunCheckpoints, stops, what: str, dist: Dist = SINGLE, progress: str = "auto",
                     log_every_s: float = 30.0) -> tuple[dict, list[str]]:
    """(scores per view, AutoAttack's warnings) of `model` on the test set, shown as it goes (`progress`: auto, bar,
    lines or off, as trainer.progress). `what` names the model in the announcement ("final evaluation", "evaluating
    <checkpoint>"); `stops` (engine.signals.StopAtOnce) is told the phase, so a stop signal names the progress file
    it leaves."""
    progress_file = progress_path(ckpts.run_dir, dist.rank, dist.world_size)
    # Training says where the evaluation's progress is (its own message names the checkpoint that stands);
    # advtrain-eval's message says it already.
    stops.phase = (f"during the final evaluation (its progress is kept in {progress_file.name})"
                   if stops.then is None else "during the evaluation")
    _say(f"{what} on {eval_cfg.n or testset.n_examples} test examples: clean, {', '.join(suite) or 'no attacks'}")
    warnings: list[str] = []
    kept = (f"the evaluation's progress up to its last finished batch is kept in {progress_file}: free some space "
            "and rerun the command to continue it")
    display = con.EvalProgress(progress if dist.is_main else "off", log_every_s)
    with ckpts.reporting_full_disk(progress_file, kept), display:
        scores = evaluate_views(model, testset, suite, n=eval_cfg.n, batch_size=eval_cfg.batch_size,
                                seed=eval_cfg.seed, views=views, dist=dist, warnings=warnings,
                                on_progress=display.line, progress_file=progress_file, watch=display)
    return scores, warnings


def record_results(results: dict, ckpts: RunCheckpoints, dist: Dist = SINGLE) -> Path:
    """results.json (rank 0 writes it), the progress file it replaces removed, the table printed."""
    if dist.is_main:
        kept = f"the evaluation's progress is kept in {progress_path(ckpts.run_dir)}: rerun the command to finish"
        with ckpts.reporting_full_disk(ckpts.results_path, kept if dist.world_size == 1 else None):
            write_results(results, ckpts.results_path)
    progress_path(ckpts.run_dir, dist.rank, dist.world_size).unlink(missing_ok=True)
    con.print_results(results)
    con.console.print(f"results: {ckpts.results_path}")
    return ckpts.results_path
