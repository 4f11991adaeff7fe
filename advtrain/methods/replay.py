"""Minibatch replay, the engine FREE-AT and DEAT share.

A minibatch is replayed r times. Each replay is ONE pass through the update's model on clamp(x + delta, 0, 1) (with
the gradient at the box's bounds that the papers' PyTorch had: `into_box`): its backward yields the weight gradient
(one optimizer step) and, from the same pass, the input gradient that moves the perturbation:
delta <- Proj(delta + step * sign(grad_delta)), Proj onto {|delta|_inf <= eps} and {x + delta in [0,1]}. The methods
differ only in where delta starts (FREE: its buffer, carried across minibatches; DEAT: a fresh uniform draw) and in
how r is chosen.
Cost: r passes per example. BN is in train mode while "attacking", since the attack is the update's own pass.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.nn import functional as F

from advtrain.methods.base import accuracy

if TYPE_CHECKING:
    from advtrain.methods.context import MethodContext


@dataclass
class Replayed:
    delta: Tensor       # after the last replay's step: where a carried buffer continues
    loss: Tensor        # CE averaged over the replays (detached scalars, like every metric)
    acc: Tensor
    last_loss: Tensor   # the last replay's: the strongest perturbation this minibatch trained on
    last_acc: Tensor
    grad: Tensor        # the last replay's input gradient of the batch-mean CE, unscaled (M-DEAT's G)


def replay(ctx: MethodContext, x: Tensor, y: Tensor, delta: Tensor, *, replays: int, step: float,
           eps: float) -> Replayed:
    """`replays` (>= 1) updates on (x, y), starting from `delta` (not written to)."""
    loss_sum = torch.zeros((), device=x.device)
    acc_sum = torch.zeros((), device=x.device)
    delta = delta.detach().clone()
    for _ in range(replays):
        delta.requires_grad_(True)
        logits = ctx.model(into_box(x + delta))
        loss = F.cross_entropy(logits, y)
        (grad,) = ctx.update(loss, inputs=(delta,))
        # A pass whose fp16-scaled gradients overflowed (the scaler skips its weight update) has inf/NaN entries:
        # zeroed, they neither reach G nor move delta. Finite gradients pass unchanged.
        grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
        with torch.no_grad():
            stepped = (delta + step * grad.sign()).clamp(-eps, eps)
            delta = (x + stepped).clamp(0, 1) - x
        last_loss, last_acc = loss.detach(), accuracy(logits, y)
        loss_sum += last_loss
        acc_sum += last_acc
    ctx.counter.add(len(y), replays)
    return Replayed(delta, loss_sum / replays, acc_sum / replays, last_loss, last_acc, grad)


def into_box(v: Tensor) -> Tensor:
    """clamp(v, 0, 1) whose gradient is 1 on the closed box [0, 1] and 0 strictly outside it.

    Recent PyTorch (2.15 here; pytorch/pytorch#184572) gives torch.clamp the subgradient 0 at its bounds, where the
    releases the FREE and DEAT papers ran gave 1. A pixel at 0 or 1 with delta = 0 there (most of an MNIST image: the
    background is 0, and a start projected into the box puts half of it at delta = 0) would get no input gradient,
    sign(0) = 0 would never move its delta, and those pixels would stay unattacked for every replay.
    """
    return torch.where((v >= 0) & (v <= 1), v, v.detach().clamp(0, 1))


def carried_buffer(buffer: Tensor | None, x: Tensor) -> Tensor:
    """The perturbation buffer carried across minibatches (FREE, DEAT with carry), as large as a full batch and on
    x's device: made (zeros) on first use or when the batch no longer fits; a smaller last batch uses its first rows."""
    if buffer is None or buffer.shape[1:] != x.shape[1:] or len(buffer) < len(x):
        return torch.zeros_like(x)
    return buffer.to(x.device)  # checkpoints load onto the CPU
