"""What a training method sees of the loop (advtrain.methods.context.MethodContext): the model, the update
primitives, the pass counter, the companion models and where we are."""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from advtrain.attacks import PassCounter
from advtrain.engine.distributed import SINGLE, Dist


@dataclass
class TrainContext:
    model: nn.Module                 # what the update runs through (may be compiled or DDP-wrapped): ONE forward
                                     # and ONE backward through it per update, as DDP requires
    attack_model: nn.Module          # the plain module: attacks take input-only gradients through it, so attack
                                     # steps never all-reduce gradients
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    counter: PassCounter
    device: torch.device
    autocast: Callable               # () -> context manager for the forward passes
    epochs: int
    batches_per_epoch: int
    epoch: int = 0
    batch_idx: int = 0
    updates: int = 0
    stop_reason: str | None = None
    fixed_batch: Callable[[int], tuple[Tensor, Tensor]] | None = None  # first n training examples, unaugmented
    dist: Dist = SINGLE              # the ranks; decisions a method takes must agree on all of them (dist.mean)
    loss_weight: float = 1.0         # this rank's share of the current global batch (Batch.weight)
    companions: dict = field(default_factory=dict)  # name -> frozen model (eval mode, no grad, outside DDP)
    accumulating: bool = False       # a backward of this step has run: gradients are being summed

    @property
    def progress(self) -> float:
        """Fraction of training done at the start of the current batch."""
        return (self.epoch + self.batch_idx / self.batches_per_epoch) / self.epochs

    def update(self, loss: Tensor, inputs: Sequence[Tensor] = ()) -> list[Tensor]:
        """One weight update from `loss`: one backward, one optimizer step.

        `inputs` are leaf tensors (requires_grad) whose gradients the same backward should also produce — FREE and
        DEAT take their attack step from the update's own pass. Their gradients come back UNSCALED, so fp16 loss
        scaling never leaks into what a method computes from them.
        """
        grads = self.backward(loss, inputs)
        self.step()
        return grads

    def backward(self, loss: Tensor, inputs: Sequence[Tensor] = (), *, last: bool = True) -> list[Tensor]:
        """Add the gradient of `loss` to the step's (several backwards, one `step()`: gradient accumulation). Every
        backward but the step's last says last=False, and under DDP skips the gradient all-reduce, which the last
        one does for the sum. Returns the unscaled gradients of `inputs`, as `update` does."""
        if not self.accumulating:
            self.optimizer.zero_grad(set_to_none=True)
            self.accumulating = True
        for t in inputs:
            t.grad = None
        weight = self.loss_weight
        if weight != 1.0:  # DDP averages the ranks' gradients; shards of unequal size need their share's weight
            loss = loss * weight
        ddp = _ddp(self.model)
        # The caller's forward ran under autocast; the backward must not (it follows the forward's dtypes anyway).
        with torch.autocast(self.device.type, enabled=False), \
                (ddp.no_sync() if ddp is not None and not last else nullcontext()):
            (loss if self.scaler is None else self.scaler.scale(loss)).backward()
        if self.scaler is not None:
            scale = self.scaler._get_scale_async()  # a device tensor: no host sync; read before update() changes it
            return [t.grad / (scale * weight) for t in inputs]
        return [t.grad if weight == 1.0 else t.grad / weight for t in inputs]

    def step(self) -> None:
        """The optimizer step over the gradients the step's backwards summed."""
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.accumulating = False
        self.updates += 1

    def request_stop(self, reason: str) -> None:
        """End training after the current epoch (e.g. FGSM-RS's catastrophic-overfitting guard)."""
        self.stop_reason = reason

    def warn(self, message: str) -> None:
        """One line on the console (rank 0 alone prints): what a method saw and trained on regardless."""
        from advtrain.logging import console as con

        con.console.print(f"warning: {message}", markup=False)


def _ddp(model: nn.Module) -> DistributedDataParallel | None:
    """The DDP wrapper in `model`'s wrapper chain (torch.compile around DDP included), if any."""
    while isinstance(model, nn.Module):
        if isinstance(model, DistributedDataParallel):
            return model
        model = getattr(model, "_orig_mod", None)
    return None
