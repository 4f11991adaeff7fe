"""Threat-model geometry: the eps ball around x intersected with the image box [0,1]^d.

All eps values are in pixel units of [0,1] (8/255 for CIFAR L-inf). Every operation is per example, so an
example's result never depends on the rest of its batch.
"""
import torch
from torch import Tensor

NORMS = ('linf', 'l2')
STARTS = ('uniform', 'uniform_raw', 'normal', 'none')


def check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; valid norms: {', '.join(NORMS)}")


def _per_example(v: Tensor, like: Tensor) -> Tensor:
    """Shape a (N,) vector so it broadcasts over like's (N, C, H, W)."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def _l2(v: Tensor) -> Tensor:
    return v.flatten(1).norm(dim=1)


def project(x_adv: Tensor, x: Tensor, eps: float, norm: str) -> Tensor:
    """Map x_adv into {||x_adv - x||_p <= eps} ∩ [0,1]^d.

    For linf this is the exact projection. For l2 it is the ball projection followed by the box clamp, the usual
    PGD practice: clamping moves every coordinate towards x (x is in the box), so the ball constraint still holds.
    """
    check_norm(norm)
    delta = x_adv - x
    if norm == 'linf':
        delta = delta.clamp(-eps, eps)
    else:
        shrink = (eps / _l2(delta).clamp_min(1e-12)).clamp(max=1.0)
        delta = delta * _per_example(shrink, delta)
    return (x + delta).clamp(0.0, 1.0)


def random_init(x: Tensor, eps: float, norm: str, kind: str, std: float = 1e-3) -> Tensor:
    """The attack's start point x + delta0, already projected.

    kind 'uniform': U(-eps, eps) per pixel (linf) or uniform in the l2 ball (random direction, radius eps·U^(1/d));
    'uniform_raw': the same draw NOT clamped to the image box [0,1], as in Wong et al.'s MNIST code (the first
    gradient is taken there; the step's projection brings the point back): on MNIST, whose pixels sit at 0 and 1,
    clamping the start removes half the noise and FGSM-RS then overfits catastrophically (docs/methods.md);
    'normal': std·N(0, I), TRADES' start (std in pixel units); 'none': x itself.
    """
    check_norm(norm)
    if kind == 'none':
        return x.clone()
    if kind == 'normal':
        delta = std * torch.randn_like(x)
    elif kind in ('uniform', 'uniform_raw') and norm == 'linf':
        delta = torch.empty_like(x).uniform_(-eps, eps)
    elif kind in ('uniform', 'uniform_raw'):
        direction = torch.randn_like(x)
        direction = direction / _per_example(_l2(direction).clamp_min(1e-12), x)
        d = x[0].numel()
        radius = eps * torch.rand(len(x), device=x.device, dtype=x.dtype) ** (1.0 / d)
        delta = direction * _per_example(radius, x)
    else:
        raise ValueError(f"unknown start {kind!r}; valid starts: {', '.join(STARTS)}")
    return x + delta if kind == 'uniform_raw' else project(x + delta, x, eps, norm)


def ascent_direction(grad: Tensor, norm: str) -> Tensor:
    """Steepest-ascent unit step for the norm: sign(grad) for linf, grad/||grad||_2 for l2.

    Computed in float32: under autocast or with half inputs the gradient may be low precision, and an l2 norm of a
    tiny half gradient underflows to 0.
    """
    grad = grad.float()
    if norm == 'linf':
        return grad.sign()
    return grad / _per_example(_l2(grad).clamp_min(1e-12), grad)
