"""Projected gradient attacks, one implementation for training and evaluation: PGD, and FGSM as its one step.

    pgd(model, x, y, eps=8/255, alpha=2/255, steps=10)                       # PGD-AT (Madry et al.)
    pgd(model, x, y, eps=8/255, alpha=10/255, steps=1)                       # FGSM-RS (Wong et al.), alpha=1.25 eps
    pgd(model, x, None, eps=8/255, alpha=2/255, steps=10, loss='kl',
        target=softmax(model(x)), start='normal')                           # TRADES' inner maximisation
    pgd(model, x, y, eps=8/255, alpha=2/255, steps=20, restarts=5)           # evaluation

eps and alpha are in pixel units of [0,1]. Only the input gradient is asked of autograd, so weight .grad buffers
are never touched and the attack costs no weight-gradient work.
"""
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from .geometry import ascent_direction, check_norm, project, random_init
from .losses import get_loss
from .modes import bn_mode
from .passes import FORWARD, PassCounter
from .taylor import Anchor, taylor_gradient


def input_gradient(loss: Tensor, x: Tensor) -> Tensor:
    """d loss / d x alone: autograd skips every weight gradient, so an attack step costs about 2/3 of a training pass.
    (scripts/bench.py swaps this for the papers' loss.backward() to measure what that saves.)"""
    (grad,) = torch.autograd.grad(loss, x)
    return grad


def _rows(mask: Tensor, like: Tensor) -> Tensor:
    return mask.view(-1, *([1] * (like.dim() - 1)))


def _ascend(model, x, y, target, loss_fn, eps, alpha, steps, norm, start, counter, record_best,
            last_grad, exact, order, init) -> Tensor:
    """One run of `steps` projected ascent steps from a fresh start point (or `init`)."""
    x_adv = random_init(x, eps, norm, start) if init is None else project(init.detach(), x, eps, norm)
    best, best_loss = x_adv, torch.full((len(x),), float('-inf'), device=x.device)
    latest = previous = None  # the two most recent exact gradients, for the Taylor approximation
    for i in range(steps):
        if exact is None or i in exact:
            x_adv = x_adv.detach().requires_grad_(True)  # a fresh leaf: `best` may still hold the previous tensor
            loss = loss_fn(model(x_adv), y, target)
            grad = input_gradient(loss.sum(), x_adv)
            x_adv = x_adv.detach()
            if exact is not None:
                latest, previous = Anchor(x_adv - x, grad), latest
            if record_best:
                better = loss.detach() > best_loss
                best = torch.where(_rows(better, x), x_adv, best)
                best_loss = torch.where(better, loss.detach(), best_loss)
        else:  # no network pass: the gradient from the partial sum of the loss's Taylor series
            grad = taylor_gradient(x_adv - x, latest, previous, order)
        if last_grad is not None and i == steps - 1:
            last_grad(grad)
        x_adv = project(x_adv + alpha * ascent_direction(grad, norm).to(x.dtype), x, eps, norm)
    if counter is not None:
        counter.add(len(x), steps if exact is None else len(exact))
    if not record_best or steps == 0:
        return x_adv
    # The last iterate has not been scored yet: one forward decides whether it beats the earlier ones.
    with torch.no_grad():
        loss = loss_fn(model(x_adv), y, target)
    if counter is not None:
        counter.add(len(x), FORWARD)
    return torch.where(_rows(loss > best_loss, x), x_adv, best)


def _misclassified(model: nn.Module, x_adv: Tensor, y: Tensor, counter: PassCounter | None) -> Tensor:
    with torch.no_grad():
        wrong = model(x_adv).argmax(dim=1) != y
    if counter is not None:
        counter.add(len(x_adv), FORWARD)
    return wrong


def pgd(model: nn.Module, x: Tensor, y: Tensor | None, *, eps: float, alpha: float, steps: int,
        norm: str = 'linf', loss: str = 'ce', start: str = 'uniform', restarts: int = 1,
        target: Tensor | None = None, bn: str = 'eval', counter: PassCounter | None = None,
        record_best: bool = False, last_grad: Callable[[Tensor], None] | None = None,
        exact_steps: Sequence[int] | None = None, order: int = 2, init: Tensor | None = None,
        skip_fooled: bool = False) -> Tensor:
    """Projected gradient ascent on `loss` inside the eps ball; returns a detached x_adv in the ball and in [0,1].

    loss 'ce' / 'cw' need labels y; 'kl' needs target = p(x) on the clean input (TRADES). record_best returns, per
    example, the iterate with the highest loss instead of the last (one extra forward). restarts > 1 returns, per
    example, the first restart's point that the model misclassifies, else the last restart's: an example is robust
    only if every restart fails. counter gets steps passes per example per restart, plus 1/3 per example for each
    misclassification check (after every restart but the last, whose outcome cannot change the choice).
    last_grad, if given, receives each restart's last input gradient (of the summed per-example loss): DEAT's
    magnitude schedule sums its |.| over an epoch.

    exact_steps (GAAT): the step indices, from 0, whose input gradient is computed; the other steps follow the
    gradient approximated from the last two computed ones (advtrain.attacks.taylor, Taylor partial sum of `order`
    1 or 2) and cost no pass. None computes every step's. init: the start point (e.g. a carried perturbation
    added to x), projected, instead of a random start.

    skip_fooled (evaluation): each restart after the first attacks only the examples no earlier restart has fooled;
    the answer is the same (a fooled example keeps its point either way), the cost falls with the model's error
    rate. It needs a model that takes any sub-batch (a per-example condition does not) and BN in eval mode (in
    train mode a smaller batch would change the statistics), so it is refused with bn='train' and last_grad.
    """
    check_norm(norm)
    loss_fn = get_loss(loss)
    if (loss == 'kl') != (target is not None):
        raise ValueError("loss 'kl' needs target (p(x) on the clean input); losses 'ce' and 'cw' take none")
    if loss != 'kl' and y is None:
        raise ValueError(f"loss {loss!r} needs labels y")
    if steps < 0 or restarts < 1:
        raise ValueError(f"need steps >= 0 and restarts >= 1, got steps={steps}, restarts={restarts}")
    exact = None if exact_steps is None else frozenset(exact_steps)
    if exact is not None and steps > 0 and (0 not in exact or not exact <= set(range(steps))):
        raise ValueError(f"exact_steps must include step 0 and lie in 0..{steps - 1}, got {sorted(exact)}")
    if restarts > 1 and loss == 'kl':
        raise ValueError("restarts > 1 pick points by misclassification: use loss 'ce' or 'cw' with labels y")
    if skip_fooled and (bn != 'eval' or last_grad is not None):
        raise ValueError("skip_fooled attacks sub-batches: it needs bn='eval' and no last_grad")
    x = x.detach()
    x_adv = fooled = None  # fooled, per example: has an earlier restart's point already been misclassified?
    with bn_mode(model, bn), torch.enable_grad():
        for r in range(restarts):
            if skip_fooled and fooled is not None:
                open_ = (~fooled).nonzero().squeeze(1)  # the examples every restart so far has failed on
                if len(open_) == 0:
                    break
                candidate = _ascend(model, x[open_], y[open_], None, loss_fn, eps, alpha, steps, norm, start,
                                    counter, record_best, None, exact, order, None if init is None else init[open_])
                x_adv = x_adv.index_copy(0, open_, candidate)
                if r < restarts - 1:
                    fooled = fooled.index_copy(0, open_, _misclassified(model, candidate, y[open_], counter))
                continue
            candidate = _ascend(model, x, y, target, loss_fn, eps, alpha, steps, norm, start, counter, record_best,
                                last_grad, exact, order, init)
            x_adv = candidate if x_adv is None else torch.where(_rows(fooled, x), x_adv, candidate)
            if r < restarts - 1:
                hit = _misclassified(model, candidate, y, counter)
                fooled = hit if fooled is None else fooled | hit
    return x_adv


def fgsm(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, norm: str = 'linf', bn: str = 'eval',
         counter: PassCounter | None = None) -> Tensor:
    """One full-size step from x itself (no random start); FGSM-RS is pgd(steps=1, alpha=1.25*eps) instead."""
    return pgd(model, x, y, eps=eps, alpha=eps, steps=1, norm=norm, start='none', bn=bn, counter=counter)
