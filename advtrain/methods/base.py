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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ContextManager, Iterator

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from advtrain.data import DatasetInfo
    from advtrain.data import Batch
    from advtrain.engine.context import TrainContext


class Method:
    """Base class: natural training. Subclasses override `train_step` and whichever hooks they need."""

    name = "natural"

    @dataclass
    class Config:
        name: str = "natural"

    def __init__(self, cfg: Any, info: DatasetInfo):
        self.cfg = cfg
        self.info = info

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """Change the model once, when it is built (before the optimizer and checkpoint loading)."""
        return model

    def setup(self, ctx: TrainContext) -> None:
        """Called once before training, after the model is on its device and any checkpoint is loaded."""

    def train_step(self, batch: Batch, ctx: TrainContext) -> dict[str, Tensor]:
        """Perform this minibatch's update(s); return detached scalar tensors to average over the epoch.

        Must include "loss"; "acc" (accuracy on the inputs the update trained on) is shown on the progress bar.
        Never call .item() here: the loop syncs with the device only at log intervals.
        """
        return cross_entropy_update(ctx, batch.x, batch.y)

    def epoch_start(self, ctx: TrainContext) -> None:
        """Called before each epoch's first batch."""

    def epoch_end(self, ctx: TrainContext, metrics: dict[str, float]) -> dict[str, float]:
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
    """A method with a K-step attack per batch. K is state, not config: a schedule (DEAT's magnitude rule) may change
    it between epochs, checkpoints carry it, and every epoch logs it."""

    def __init__(self, cfg: Any, info: DatasetInfo):
        super().__init__(cfg, info)
        self.steps = cfg.steps

    def epoch_end(self, ctx: TrainContext, metrics: dict[str, float]) -> dict[str, float]:
        return {"attack_steps": float(self.steps)}

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])


def cross_entropy_update(ctx: TrainContext, x: Tensor, y: Tensor) -> dict[str, Tensor]:
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
