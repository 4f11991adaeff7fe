"""The training-method plug-in interface.

A method says how one minibatch becomes weight updates; the shared loop (advtrain.engine.loop) owns everything
else: data, precision, LR, timing, checkpoints, logging. The hooks cover the shapes the methods take:

- most methods attack, then update once (PGD-AT, FGSM-RS, TRADES, RAT, GAAT): `train_step` calls `ctx.update` once;
- replay methods update several times per minibatch, reusing the update's own backward for the attack (FREE, DEAT):
  `ctx.update(loss, inputs=(delta,))` returns the unscaled input gradients of that same pass;
- schedule-driven methods change their attack between epochs (DEAT's magnitude rule): `epoch_end` returns the
  values to log and may change the method's state, which `state_dict` carries into checkpoints;
- methods that change the model (OAT's conditioning, RRM's projection) do it in `wrap_model`, before the optimizer
  sees the parameters; methods that need a second, frozen model (RRM's teacher) load it in `setup`;
- methods whose model has several evaluation settings (OAT's lambda) list them in `eval_views`.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, fields
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, ContextManager, Iterator

import torch
from torch import Tensor, nn

from advtrain.attacks import pgd
from advtrain.methods.schedules import GradMagnitude, MagnitudeRule
from advtrain.schema import MethodConfig

if TYPE_CHECKING:
    from advtrain.data import DatasetInfo
    from advtrain.data import Batch
    from advtrain.methods.context import MethodContext


class Method:
    """Base class: natural training. Subclasses override `train_step` and whichever hooks they need, and declare
    their settings in a nested `Config(MethodConfig)` dataclass that mirrors their YAML."""

    Config = MethodConfig

    def __init__(self, cfg: Any, info: DatasetInfo):
        self.cfg = cfg
        self.info = info
        self._full_cfg, self._threat_scale = cfg, 1.0

    @property
    def full_cfg(self) -> Any:
        """The configured settings, whatever the ε warm-up's current scale (self.cfg is the scaled view)."""
        return self._full_cfg

    def scale_threat_model(self, factor: float) -> None:
        """Scale every setting in pixel units (eps, step sizes, start radii: the Config fields marked pixel()) by
        `factor` in [0, 1], the ε warm-up of trainer.eps_warmup; 1 restores the configured values exactly."""
        if factor == self._threat_scale:
            return
        self._threat_scale = factor
        if factor == 1.0:
            self.cfg = self._full_cfg
            return
        full = self._full_cfg
        scaled = {f.name: getattr(full, f.name) for f in fields(self.Config) if f.name in full}
        for f in fields(self.Config):
            if f.metadata.get("pixel") and scaled.get(f.name) is not None:
                scaled[f.name] = scaled[f.name] * factor
        self.cfg = SimpleNamespace(**scaled)

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """Change the model once, when it is built (before the optimizer and checkpoint loading)."""
        return model

    def setup(self, ctx: MethodContext) -> None:
        """Called once before training, after the model is on its device and any checkpoint is loaded."""

    def train_step(self, batch: Batch, ctx: MethodContext) -> dict[str, Tensor]:
        """Perform this minibatch's update(s); return detached scalar tensors to average over the epoch.

        Must include "loss"; "acc" (accuracy on the inputs the update trained on) is shown on the progress bar.
        Never call .item() here: the loop syncs with the device only at log intervals.
        """
        return cross_entropy_update(ctx, batch.x, batch.y)

    def epoch_start(self, ctx: MethodContext) -> None:
        """Called before each epoch's first batch."""

    def epoch_end(self, ctx: MethodContext, metrics: dict[str, float]) -> dict[str, float]:
        """Called after each epoch with its averaged metrics; returns extra per-epoch values to log."""
        return {}

    def eval_views(self, model: nn.Module) -> Iterator[tuple[str, ContextManager]]:
        """The settings a trained model is evaluated in: (suffix for metric names, context that applies it)."""
        yield "", nullcontext()

    def state_dict(self) -> dict[str, Any]:
        """State carried in checkpoints: tensors, numbers, strings and containers of them only."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class StepsMethod(Method):
    """A method with a K-step attack per batch. K is state, not config: a schedule may change it between epochs,
    checkpoints carry it, and every epoch logs it.

    steps_schedule=magnitude is DEAT's "M+" acceleration: K = 0 (clean training) in epoch 0, then 1, then one more
    after each epoch whose G (|input gradient| of the attacks' last steps, summed over the epoch) exceeds the
    threshold, or while alpha * K < eps; `steps` is the most K grows to (advtrain.methods.schedules).
    """

    def __init__(self, cfg: Any, info: DatasetInfo):
        super().__init__(cfg, info)
        self.steps = cfg.steps
        self.schedule: MagnitudeRule | None = None
        if getattr(cfg, "steps_schedule", "none") == "magnitude":  # older checkpoints' configs lack the key
            self.schedule = MagnitudeRule(start=0, most=cfg.steps, gamma=cfg.gamma, alpha=cfg.alpha, eps=cfg.eps)
            self.steps = self.schedule.count
            self.grad_mag = GradMagnitude()

    def attack(self, ctx: MethodContext, x: Tensor, y: Tensor | None, **kwargs) -> Tensor:
        """The method's PGD with the current K; under a schedule, its last step's gradient also feeds G."""
        c = self.cfg
        common = dict(eps=c.eps, alpha=c.alpha, steps=self.steps, bn=c.bn, counter=ctx.counter, **kwargs)
        last_grad = None if self.schedule is None else self.grad_mag.add
        return pgd(ctx.attack_model, x, y, last_grad=last_grad, **common)

    def epoch_end(self, ctx: MethodContext, metrics: dict[str, float]) -> dict[str, float]:
        used = {"attack_steps": float(self.steps)}
        if self.schedule is None:
            return used
        g, threshold = self.grad_mag.read(ctx.dist), self.schedule.threshold
        self.steps = self.schedule.after_epoch(ctx.epoch, g=g)
        return {**used, "G": g, **({} if threshold is None else {"threshold": threshold})}

    def state_dict(self) -> dict[str, Any]:
        if self.schedule is None:
            return {"steps": self.steps}
        return {"steps": self.steps, "schedule": self.schedule.state_dict(), "G": self.grad_mag.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        if self.schedule is not None:
            self.schedule.load_state_dict(state["schedule"])
            self.grad_mag.load_state_dict(state["G"])


def cross_entropy_update(ctx: MethodContext, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """One update on CE(f(x), y), counted as one pass per example: the last step of most methods."""
    logits = ctx.model(x)
    loss = nn.functional.cross_entropy(logits, y)
    ctx.update(loss)
    ctx.counter.add(len(y), 1)
    return {"loss": loss.detach(), "acc": accuracy(logits, y)}


def accuracy(logits: Tensor, y: Tensor) -> Tensor:
    return (logits.argmax(1) == y).float().mean().detach()


@torch.no_grad()
def copy_weights(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
