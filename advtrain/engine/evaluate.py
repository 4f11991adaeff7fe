"""Evaluation: clean accuracy plus every attack of the suite, on the first n examples of an evaluation set.

Evaluation runs in fp32 with BN in eval mode (the attack code sees to it), so the numbers describe the deployed
model. An example counts as robust under an attack only if it is also classified correctly without one, as AutoAttack
and RobustBench count it. A method whose model has several settings (OAT's lambda) is evaluated in each of its views,
each a plain model (`advtrain.models.bind`) that the attacks see like any other. With several ranks each evaluates
its contiguous share of the n examples (AutoAttack included) and the counts are summed over ranks: every rank returns
the same, global numbers.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from advtrain.attacks import build_attack
from advtrain.engine.distributed import SINGLE, Dist
from advtrain.data.loader import shard
from advtrain.engine.eval_progress import EvalProgress
from advtrain.engine.results import attack_suite
from advtrain.methods.base import View
from advtrain.models import bind

PLAIN = (View(""),)


def evaluate(model: nn.Module, evalset, suite: Mapping[str, Mapping], *, n: int | None, batch_size: int,
             seed: int = 0, on_progress: Callable[[str], None] | None = None, dist: Dist = SINGLE,
             warnings: list[str] | None = None) -> dict:
    """The plain model's scores: {"n", "clean", <attack>: accuracy, ...} (see evaluate_views)."""
    return evaluate_views(model, evalset, suite, n=n, batch_size=batch_size, seed=seed, on_progress=on_progress,
                          dist=dist, warnings=warnings)[""]


def evaluate_views(model: nn.Module, evalset, suite: Mapping[str, Mapping], *, n: int | None, batch_size: int,
                   seed: int = 0, views: Sequence[View] = PLAIN, on_progress: Callable[[str], None] | None = None,
                   dist: Dist = SINGLE, warnings: list[str] | None = None,
                   progress_file: Path | None = None, watch=None) -> dict[str, dict]:
    """view name -> {"n", "clean", <attack>: accuracy, ...}.

    `seed` seeds the attacks' random starts on a forked RNG: the numbers repeat, and the caller's stream (training
    after a periodic evaluation) goes on as if no evaluation had run. An attack made of several (AutoAttack) also
    reports the accuracy after each of its parts, as "<name>/<part>" (e.g. "autoattack/square"); the reliability
    warnings they raise are added, once each and from every rank, to `warnings`.

    `progress_file`, if given, is this rank's progress file (advtrain.engine.eval_progress): the evaluation saves
    its state there after every batch and, run again with the same model and settings, goes on from the last batch
    saved. `on_progress` gets a line per batch (examples done, running accuracies, elapsed and ETA); `watch`, if
    given, follows the evaluation within a batch (advtrain.logging.console.EvalProgress: `view`, `attacking`,
    `stage` for each of AutoAttack's attacks, `step`)."""
    attacks = {name: build_attack(name, spec) for name, spec in suite.items()}
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    kept = None if progress_file is None else EvalProgress(
        progress_file, model, suite, n=n, batch_size=batch_size, seed=seed, views=[v.name for v in views],
        rank=dist.rank, world_size=dist.world_size)
    found: list[str] = list(kept.found) if kept is not None else []
    if on_progress and kept is not None and kept.views:
        done = ", ".join(f"{kept.done(v)[1]} examples{f' of view {v}' if v else ''}" for v in kept.views)
        on_progress(f"evaluation resumed from {kept.path.name}: {done} already evaluated")
    try:
        with torch.random.fork_rng([device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            scores = {view.name: _evaluate(bind(model, view.cond), view.name, evalset, attacks, n, batch_size,
                                           on_progress, dist, found, kept, watch) for view in views}
    finally:
        model.train(was_training)
    if warnings is not None:
        for rank_found in dist.gather(found):
            warnings.extend(w for w in rank_found if w not in warnings)
    return scores


def planned(evalset, n: int | None, batch_size: int, dist: Dist = SINGLE) -> tuple[int, int]:
    """(examples, batches) this rank evaluates of the first n."""
    part = shard(evalset.n_examples if n is None else min(n, evalset.n_examples), dist.rank, dist.world_size)
    examples = part.stop - part.start
    return examples, -(-examples // batch_size)


def _evaluate(model, view: str, evalset, attacks, n, batch_size, on_progress, dist, found,
              kept: EvalProgress | None, watch) -> dict:
    parts = {name: getattr(attack, "attack_names", []) for name, attack in attacks.items()}
    # Every key exists on every rank from the start: the counts are summed over ranks by position.
    counts = {"clean": 0, **{name: 0 for name in attacks},
              **{f"{name}/{part}": 0 for name in attacks for part in parts[name]}}
    total, skip = 0, 0
    if kept is not None:
        saved, total, skip = kept.done(view)
        counts.update(saved)
    examples, batches = planned(evalset, n, batch_size, dist)
    if watch is not None:
        watch.view(view, examples, total, list(attacks))
    start, resumed_at = time.perf_counter(), total
    for i, (x, y) in enumerate(evalset.batches(batch_size, n, dist.rank, dist.world_size)):
        if i < skip:  # evaluated before the run was stopped: its counts are in `counts` already
            continue
        if kept is not None:
            kept.restore_rng()
        with torch.no_grad():
            clean = model(x).argmax(1) == y
        counts["clean"] += int(clean.sum())
        if watch is not None:
            watch.step(len(y))
        for name, attack in attacks.items():
            if watch is not None:
                watch.attacking(name, i, batches)
                if hasattr(attack, "on_stage"):  # AutoAttack: its attacks as they finish on this batch
                    attack.on_stage = lambda part, pct, s, name=name: watch.stage(name, part, pct, s)
            counts[name] += int((attack(model, x, y) & clean).sum())
            if watch is not None:
                watch.step(len(y))
            for part, robust in getattr(attack, "robust_after", {}).items():
                counts[f"{name}/{part}"] += robust
            # AutoAttack checks each batch it is given, so its percentages are the batch's: say so. The whole
            # evaluation's accuracy after each of its attacks is in the scores ("<name>/square", ...).
            labelled = (f"{name}, on an evaluation batch of {len(y)} examples: {w}"
                        for w in getattr(attack, "warnings", ()))
            found.extend(w for w in labelled if w not in found)
        total += len(y)
        if kept is not None:
            kept.save(view, counts, total, i + 1, found)
        accs = ", ".join(f"{k} {100 * v / total:.2f}%" for k, v in counts.items() if "/" not in k)
        if watch is not None:
            watch.step(0, {k: v / total for k, v in counts.items() if "/" not in k})
        if on_progress:
            on_rank = f" (rank 0 of {dist.world_size})" if dist.enabled else ""
            label = f"eval {view}" if view else "eval"
            elapsed = time.perf_counter() - start
            eta = elapsed / (total - resumed_at) * (examples - total)  # this run's pace, not the stopped one's
            on_progress(f"{label}: {total} examples of {examples}{on_rank}, {accs} ({elapsed:.0f} s, "
                        f"ETA {eta:.0f} s)")
    *summed, total = dist.sum([*counts.values(), total])
    return {"n": int(total), **{name: count / max(total, 1) for name, count in zip(counts, summed)}}


class RunEvaluation:
    """A run's evaluations: its attack suite, the method's views, and model selection on the held-out split."""

    def __init__(self, cfg, method, data, dist: Dist = SINGLE):
        self.cfg, self.method, self.data, self.dist = cfg, method, data, dist
        self.suite = attack_suite(cfg)

    def periodic(self, model: nn.Module, state, save_best: Callable[[], str]) -> dict:
        """The evaluation every eval.every epochs (no AutoAttack): on the validation split if there is one, where
        the weights scoring highest by the method's select_score are kept as best.pt (never on the test set)."""
        e = self.cfg.eval
        monitor = self.data.val if self.data.val is not None else self.data.test
        scores = evaluate_views(model, monitor, periodic_suite(self.suite), n=e.every_n, batch_size=e.batch_size,
                                seed=e.seed, views=self.method.eval_views(), dist=self.dist)
        if self.data.val is not None:
            score = self.method.select_score(scores)
            if state.best_val_score is None or score > state.best_val_score:
                state.best_val_score = score
                save_best()
        return flat(scores)


def flat(scores: Mapping[str, Mapping]) -> dict:
    """One view's scores as metric -> value, a named view's keys prefixed "<view>/" (for logging)."""
    return {(f"{view}/{k}" if view else k): v for view, s in scores.items() for k, v in s.items()}


def periodic_suite(suite: Mapping[str, Mapping]) -> dict:
    """The attacks run during training: the suite without AutoAttack, whose cost belongs to the final evaluation."""
    return {name: spec for name, spec in suite.items() if spec["type"] != "autoattack"}
