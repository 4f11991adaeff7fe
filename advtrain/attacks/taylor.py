"""The input gradient of the adversarial loss, approximated from a partial sum of its Taylor series (GAAT).

Near an anchor point δ_a where the exact gradient g_a = ∇δ L(x + δ_a) is known,

    L(x + δ)   ≈ L(x + δ_a) + g_aᵀ(δ − δ_a) [+ ½ (δ − δ_a)ᵀ H_a (δ − δ_a)]      (order 1 [order 2])
    ∇δ L(x + δ) ≈ g_a [+ H_a (δ − δ_a)]

H_a is never formed. Its action is estimated per example from the two most recent exact gradients (a secant, as
quasi-Newton methods do): with s = δ_a − δ_b and u = g_a − g_b,  H_a v ≈ u · (sᵀv) / (sᵀs). The estimate is exact
along s and blind across it: for a quadratic loss with Hessian A the order-2 error is A·v⊥, v⊥ the part of
v = δ − δ_a orthogonal to s, and the order-1 error is A·v (tests/test_gaat.py checks both).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Anchor:
    """An attack point (as δ, per example) where the exact input gradient was taken."""
    delta: Tensor
    grad: Tensor


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-example inner product, shaped to broadcast over (N, ...)."""
    return (a * b).flatten(1).sum(1).view(-1, *([1] * (a.dim() - 1)))


def taylor_gradient(delta: Tensor, latest: Anchor, previous: Anchor | None = None, order: int = 2) -> Tensor:
    """∇δ L(x + δ) approximated at `delta` from the latest exact gradient and, for order 2, the secant through the
    previous one. With no previous anchor the order-2 sum falls back to order 1 (no curvature is known yet)."""
    if order not in (1, 2):
        raise ValueError(f"the Taylor partial sum has order 1 or 2, not {order}")
    if order == 1 or previous is None:
        return latest.grad
    s = latest.delta - previous.delta
    u = latest.grad - previous.grad
    ss = _dot(s, s)
    # Where the two anchors coincide (s = 0) nothing is known about curvature: keep the first-order term.
    coef = torch.where(ss > 0, _dot(s, delta - latest.delta) / ss.clamp_min(torch.finfo(ss.dtype).tiny), 0.0)
    return latest.grad + u * coef
