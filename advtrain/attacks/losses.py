"""Attack objectives, one value per example (the engine sums them).

Summing rather than averaging keeps each example's input gradient independent of the batch size: the gradient
of a mean shrinks as 1/B, which skews gradient-magnitude statistics (M-DEAT's G_t) and can underflow to a zero
sign in low precision.
Logits are cast to float32 first so the losses are accurate under autocast.
"""
from typing import Callable

import torch.nn.functional as F
from torch import Tensor

LOSSES = ('ce', 'cw', 'kl')


def cross_entropy(logits: Tensor, y: Tensor, target: Tensor | None = None) -> Tensor:
    return F.cross_entropy(logits.float(), y, reduction='none')


def cw_margin(logits: Tensor, y: Tensor, target: Tensor | None = None) -> Tensor:
    """Carlini-Wagner margin max_{j != y} z_j - z_y: positive exactly when the example is misclassified."""
    logits = logits.float()
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float('-inf'))
    return others.amax(dim=1) - true


def trades_kl(logits: Tensor, y: Tensor | None, target: Tensor) -> Tensor:
    """KL(target || softmax(logits)), target = p(x) computed once on the clean input by the caller."""
    log_p = F.log_softmax(logits.float(), dim=1)
    return F.kl_div(log_p, target.float(), reduction='none').sum(dim=1)


def get_loss(name: str) -> Callable[[Tensor, Tensor | None, Tensor | None], Tensor]:
    if name not in LOSSES:
        raise ValueError(f"unknown attack loss {name!r}; valid losses: {', '.join(LOSSES)}")
    return {'ce': cross_entropy, 'cw': cw_margin, 'kl': trades_kl}[name]
