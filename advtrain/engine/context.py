"""What a training method sees of the loop: the model, the update primitive, the pass counter and where we are."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

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
        self.optimizer.zero_grad(set_to_none=True)
        for t in inputs:
            t.grad = None
        weight = self.loss_weight
        if weight != 1.0:  # DDP averages the ranks' gradients; shards of unequal size need their share's weight
            loss = loss * weight
        # The caller's forward ran under autocast; the backward must not (it follows the forward's dtypes anyway).
        with torch.autocast(self.device.type, enabled=False):
            (loss if self.scaler is None else self.scaler.scale(loss)).backward()
        if self.scaler is not None:
            scale = self.scaler._get_scale_async()  # a device tensor: no host sync; read before update() changes it
            grads = [t.grad / (scale * weight) for t in inputs]
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            grads = [t.grad if weight == 1.0 else t.grad / weight for t in inputs]
            self.optimizer.step()
        self.updates += 1
        return grads

    def request_stop(self, reason: str) -> None:
        """End training after the current epoch (e.g. FGSM-RS's catastrophic-overfitting guard)."""
        self.stop_reason = reason
