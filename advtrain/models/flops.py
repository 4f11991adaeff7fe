"""The forward cost of a network, in the unit width-slimming papers report as FLOPs: multiply-adds.

    forward_flops(model, (3, 32, 32), cond=FixedSlim(0.5, FixedLambda(0.0, lambdas)))

counts, on one input of that shape, the multiply-adds of every convolution and linear layer the forward runs, at the
sizes they run at (a slimmed layer counts its slice), FiLM's MLPs included. torch.utils.flop_counter counts two
FLOPs per multiply-add, so its number is twice this one. BatchNorm, activations and pooling are not counted.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .classifier import bind


def forward_flops(model: nn.Module, in_shape: tuple[int, int, int], cond: Any = None) -> int:
    """Multiply-adds of one forward of one example of `in_shape`, the model bound to `cond`; BN in eval mode, so
    the count touches no statistics, and the model's train/eval modes come back as they were."""
    total = 0

    def count(module: nn.Module, inputs: tuple[Tensor, ...], out: Tensor) -> None:
        nonlocal total
        x = inputs[0]
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            total += out.numel() * (x.shape[1] // module.groups) * kh * kw
        else:
            total += out.numel() * x.shape[-1]

    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    modes = [(m, m.training) for m in model.modules()]
    handles = [layer.register_forward_hook(count) for layer in layers]
    device = next(model.parameters()).device
    try:
        model.eval()
        with torch.no_grad():
            bind(model, cond)(torch.zeros(1, *in_shape, device=device))
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training
    return int(total)
