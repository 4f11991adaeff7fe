"""The one training loop. Methods plug in through advtrain.methods.base.Method; nothing here knows any method.

Per epoch: the method's epoch_start, then for every minibatch the LR for the current training progress and the
method's train_step under autocast; epoch_end (schedules, guards); then, outside the timed region, optional
periodic evaluation, logging and the checkpoint. The hot loop never syncs with the device except where the
display or the NaN check asks for numbers, both at a bounded rate.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from advtrain.engine.context import TrainContext
from advtrain.engine.optim import lr_factor, set_lr
from advtrain.engine.signals import STOP_SIGNALS, Interrupted, catch_signals
from advtrain.engine.timing import Stopwatch
from advtrain.errors import TrainingError


@dataclass
class LoopState:
    """Where training stands; saved in checkpoints so a resumed run continues exactly."""
    epoch: int = 0                   # the epoch to run next (or the one interrupted)
    batch: int = 0                   # the batch of `epoch` to run next
    train_time_s: float = 0.0
    epoch_times_s: list = field(default_factory=list)
    history: list = field(default_factory=list)  # one dict per finished epoch
    finished: bool = False
    stop_reason: str | None = None
    partial_sums: dict = field(default_factory=dict)  # metric sums of an interrupted epoch's finished batches
    partial_n: int = 0
    partial_time_s: float = 0.0  # training seconds of the interrupted epoch before its checkpoint
    best_val_score: float | None = None  # robust accuracy of checkpoints/best.pt on the validation split


@dataclass(frozen=True)
class LoopSettings:
    """The few settings the loop reads of a run's config (LoopSettings.of(cfg))."""
    epochs: int
    peak_lr: float
    schedule: Any                    # the LR schedule section, as engine.optim.lr_factor reads it
    eps_warmup: float = 0.0          # fraction of training over which the threat model ramps up
    nan_check_every: int = 50        # steps between NaN checks of the loss
    checkpoint_every: int = 1        # epochs between checkpoints (0: only at the end)
    eval_every: int = 0              # epochs between periodic evaluations (0: none)

    @classmethod
    def of(cls, cfg) -> "LoopSettings":
        t = cfg.trainer
        return cls(epochs=t.epochs, peak_lr=cfg.optim.lr, schedule=cfg.schedule,
                   eps_warmup=t.get("eps_warmup", 0.0), nan_check_every=t.nan_check_every,
                   checkpoint_every=t.checkpoint_every, eval_every=cfg.eval.every)

    def eval_due(self, epoch: int) -> bool:
        """Periodic evaluation after `epoch` (0-based); never after the last, which the final evaluation covers."""
        return bool(self.eval_every) and (epoch + 1) % self.eval_every == 0 and epoch + 1 < self.epochs


@dataclass
class _Epoch:
    """One epoch's running numbers: metric sums (device tensors, no host sync), examples seen, the last LR."""
    index: int
    start_time: float                # the stopwatch's reading when the epoch began (before a resume, if one)
    sums: dict
    n_seen: int
    lr: float


def run_epochs(ctx: TrainContext, method, loader, settings: LoopSettings, state: LoopState, *, progress,
               save: Callable[[LoopState], str], on_epoch: Callable[[dict], None],
               periodic_eval: Callable[[], dict] | None) -> LoopState:
    """Train from `state` to the end. `save(state)` writes a checkpoint and returns its path.

    With several ranks every decision that ends or branches the loop (a signal, a NaN, a method's early stop) is
    agreed on by all ranks at the same step, so no rank waits in a collective for a peer that has left.
    """
    dist = ctx.dist
    watch = Stopwatch(ctx.device, state.train_time_s)
    with catch_signals(*STOP_SIGNALS) as interrupted, progress:
        for epoch in range(state.epoch, settings.epochs):
            ctx.epoch = epoch
            progress.epoch(epoch, state.batch)
            run = _begin_epoch(ctx, method, epoch, state, watch)
            _run_batches(ctx, method, loader, settings, state, run, watch, interrupted, progress, save)
            record = _end_epoch(ctx, method, run, state, watch, settings.epochs)
            if periodic_eval is not None and settings.eval_due(epoch):
                record.update({f"eval/{k}": v for k, v in periodic_eval().items()})
            state.history.append(record)
            on_epoch(record)
            every = settings.checkpoint_every
            if state.finished or (every and state.epoch % every == 0):
                save(state)
            (signum,) = dist.max([interrupted.signum or 0])
            if signum:
                raise Interrupted(signum, save(state), interrupted.previous.get(signum))
            if ctx.stop_reason is not None:
                progress.print(f"stopping early: {ctx.stop_reason}")
                break
    return state


def _begin_epoch(ctx: TrainContext, method, epoch: int, state: LoopState, watch: Stopwatch) -> _Epoch:
    """The epoch's start: the method's epoch_start, and the sums an interrupted epoch carried (global sums, held
    by rank 0) to continue from."""
    start_time = watch.elapsed - state.partial_time_s  # the epoch's time spans a resume
    watch.start()
    method.epoch_start(ctx)
    carried = state.partial_sums if ctx.dist.is_main else {k: 0.0 for k in state.partial_sums}
    sums = {k: torch.tensor(v, device=ctx.device) for k, v in carried.items()}
    # The LR to record when a resume finds no batch left to run.
    return _Epoch(epoch, start_time, sums, state.partial_n if ctx.dist.is_main else 0,
                  ctx.optimizer.param_groups[0]["lr"])


def _run_batches(ctx: TrainContext, method, loader, settings: LoopSettings, state: LoopState, run: _Epoch,
                 watch: Stopwatch, interrupted, progress, save) -> None:
    """The epoch's minibatches from state.batch on, with the NaN check and the progress display; a signal before
    the last batch checkpoints mid-epoch and raises Interrupted."""
    dist = ctx.dist
    last_batch = len(loader) - 1
    for ctx.batch_idx, batch in enumerate(loader.epoch(run.index, state.batch), start=state.batch):
        run.lr = train_batch(ctx, method, batch, settings, run.sums)
        run.n_seen += len(batch.y)
        progress.step()
        steps_done = ctx.batch_idx + 1 - state.batch
        (signum,) = dist.max([interrupted.signum or 0])
        if signum or steps_done % settings.nan_check_every == 0:
            _check_finite(run.sums["loss"], run.index, ctx.batch_idx, dist)
        if progress.due():
            elapsed = max(watch.peek() - run.start_time, 1e-9)
            progress.show({**{k: float(v) / run.n_seen for k, v in run.sums.items()}, "lr": run.lr,
                           "img/s": run.n_seen * dist.world_size / elapsed})
        # A signal on an epoch's last batch is served after the epoch is recorded (run_epochs), so a checkpoint
        # never holds an epoch with every batch run and no record.
        if signum and ctx.batch_idx < last_batch:
            _interrupt_mid_epoch(ctx, state, run, watch)
            raise Interrupted(signum, save(state), interrupted.previous.get(signum))


def _interrupt_mid_epoch(ctx: TrainContext, state: LoopState, run: _Epoch, watch: Stopwatch) -> None:
    """Where an interrupted epoch stands, in `state` for its checkpoint: the next batch, the metric sums over every
    rank so far and the epoch's training time, so the resumed epoch reports what an uninterrupted one would."""
    watch.stop()
    state.batch, state.train_time_s = ctx.batch_idx + 1, watch.elapsed
    *totals, total_n = ctx.dist.sum([float(v) for v in run.sums.values()] + [run.n_seen])
    state.partial_sums, state.partial_n = dict(zip(run.sums, totals)), int(total_n)
    state.partial_time_s = watch.elapsed - run.start_time


def _end_epoch(ctx: TrainContext, method, run: _Epoch, state: LoopState, watch: Stopwatch, epochs: int) -> dict:
    """The finished epoch: the metrics over every rank, the method's epoch_end, the time, and `state` moved to the
    next epoch. Returns the epoch's record (what is logged and kept in state.history)."""
    dist = ctx.dist
    state.partial_sums, state.partial_n, state.partial_time_s = {}, 0, 0.0
    *totals, n_seen = dist.sum([float(v) for v in run.sums.values()] + [run.n_seen])
    metrics = {k: total / max(n_seen, 1) for k, total in zip(run.sums, totals)}
    if not math.isfinite(metrics.get("loss", 0.0)):
        raise TrainingError(_nan_message(run.index, ctx.batch_idx))
    extra = method.epoch_end(ctx, metrics)
    ctx.stop_reason = next((r for r in dist.gather(ctx.stop_reason) if r is not None), None)
    watch.stop()
    epoch_time = watch.elapsed - run.start_time
    state.train_time_s = watch.elapsed
    state.epoch_times_s.append(epoch_time)
    state.epoch, state.batch = run.index + 1, 0
    state.stop_reason = ctx.stop_reason
    state.finished = state.epoch >= epochs or ctx.stop_reason is not None
    return {"epoch": run.index + 1, **{f"train/{k}": v for k, v in metrics.items()},
            **{f"method/{k}": v for k, v in extra.items()},
            "lr": run.lr, "epoch_time_s": epoch_time, "train_time_s": state.train_time_s,
            "images_per_s": n_seen / max(epoch_time, 1e-9)}


def train_batch(ctx: TrainContext, method, batch, settings: LoopSettings, sums: dict) -> float:
    """One minibatch: the LR for this point of training, the method's step under autocast, and the step's metrics
    added to `sums` (device tensors, weighted by rows: no host sync). Returns the LR used."""
    lr = set_lr(ctx.optimizer, settings.peak_lr, lr_factor(settings.schedule, ctx.progress))
    method.threat.scale = eps_factor(settings.eps_warmup, ctx.progress)
    ctx.loss_weight = batch.weight
    with ctx.autocast():
        out = method.train_step(batch, ctx)
    n = len(batch.y)
    for k, v in out.items():
        sums[k] = sums.get(k, 0.0) + v.float() * n
    return lr


def eps_factor(warmup: float, progress: float) -> float:
    """The threat model's share at training progress `progress`: a linear ramp 0 -> 1 over the first `warmup` of
    training, then 1 (set per minibatch, like the LR, so it is the same function of progress for every method)."""
    return 1.0 if warmup <= 0 or progress >= warmup else progress / warmup


def _check_finite(loss_sum: torch.Tensor, epoch: int, batch: int, dist) -> None:
    (nonfinite,) = dist.max([int(not torch.isfinite(loss_sum).item())])
    if nonfinite:
        raise TrainingError(_nan_message(epoch, batch))


def _nan_message(epoch: int, batch: int) -> str:
    return (f"the training loss became NaN/inf in epoch {epoch + 1} (by batch {batch + 1}); no checkpoint was "
            "written from it. Lower optim.lr, or use trainer.precision=fp32 or bf16 instead of fp16")
