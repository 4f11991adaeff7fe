"""GradAlign: FGSM (or FGSM-RS) training with the gradient-alignment regulariser of Andriushchenko & Flammarion,
"Understanding and Improving Fast Adversarial Training" (NeurIPS 2020). It follows the authors' code,
github.com/tml-epfl/understanding-fast-adv-training, train.py (the `attack == 'fgsm'` branch and the
`grad_align_cos_lambda` block) and utils.py (get_input_grad, get_uniform_delta, l2_norm_batch):

    loss = CE(f(x + delta_fgsm), y) + lambda * (1 - mean_i cos(g1_i, g2_i))
    g1 = grad_x CE(f(x0), y)         at the FGSM start point x0 (x itself for start=none), DETACHED
    g2 = grad_x CE(f(x + eta), y)    eta ~ U(-eps, eps)^d, NOT clamped to [0,1], with create_graph=True

Decisions, each as train.py / utils.py does it:
- g1 is the FGSM step's own input gradient, reused: train.py takes it with create_graph and then `grad.detach()`,
  so no second-order term flows through it and it costs nothing beyond the FGSM step (taken here without
  create_graph: the same value, no wasted graph).
- g2 is get_input_grad(..., delta_init='random_uniform', backprop=True): a fresh uniform point in the eps-ball
  around x, the model fed x + eta without clamping to the image box, the gradient kept in the graph, so the
  update's backward differentiates through it (double backpropagation) into the weights.
- the cosine is per example, over all pixels; examples where either gradient is exactly zero are left out and the
  mean runs over the rest (train.py's grads_nnz_idx); with none left the term is 0 (train.py would give NaN).
- the gradients are of the batch-mean CE (F.cross_entropy), as theirs; the cosine does not depend on the scale.
- lambda = `grad_align_lambda`: 0.2 at eps = 8/255 on CIFAR-10, their headline setting; their CIFAR-10 sweep
  (sh/exps_diff_eps_cifar10.sh) interpolates log-linearly, lambda = 0.02 * 10^(eps*255/8) (0.112 at 6/255, 0.632 at
  12/255, 2.0 at 16/255); other datasets need their own value. lambda = 0 skips the regulariser (plain FGSM), as
  train.py does.
- FGSM: their GradAlign runs use --attack_init=zero (start=none here) and the default --fgsm_alpha=1.25, i.e.
  delta = clamp(1.25 eps sign(g1), -eps, eps): a full eps step. start=uniform is FGSM-RS (their attack_init=random);
  the step is advtrain's pgd (steps=1): projected to the ball and to [0,1] as train.py's two clamps do.
  (train.py differentiates w.r.t. delta through clamp(x + delta, 0, 1), which zeroes g1 where a random start is
  clamped; advtrain's pgd takes the gradient at the clamped point. With start=none they agree.)
- BN: train.py keeps the model in train mode for every forward (FGSM, the update and g2's), so `bn: train` (the
  attack's and g2's mode; the update's forward is always in train mode). BN statistics move on all three.
- the logged "loss" is CE + the regulariser, as train.py's train_loss; "grad_align" is the weighted term, their
  train_reg; "grad_cos" the mean cosine.

Cost in passes per example (advtrain.attacks.passes: forward + backward = 1, a backward = two forwards):
  1  the FGSM step (g1 comes with it)
  1  g2: a forward and a backward, kept in the graph
  1  the update's forward and backward through CE
  2  the update's backward through g2's forward+backward graph: reverse mode over a graph costs about twice that
     graph (the same 2:1 as backward:forward), and g2's graph is one pass
  = 5 (FGSM alone: 2). Passes do not model that double-backward kernels (BatchNorm's, conv's) run less
  efficiently than first-order ones: compare the time each epoch took, logged beside the count.

Double backpropagation through DDP's reducer and through torch.compile is not supported: such runs are refused in
one line (compilable=False; trainer.devices > 1 in setup). Under fp16 autocast g2 is not loss-scaled (the authors'
apex code scales it), so tiny gradients may underflow to zero and leave their examples out of the mean; use bf16.

    advtrain method=gradalign                                   # FGSM + GradAlign, lambda 0.2 (CIFAR-10, 8/255)
    advtrain method=gradalign method.start=uniform              # FGSM-RS + GradAlign
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from advtrain.attacks import bn_mode, pgd, random_init
from advtrain.errors import ConfigError
from advtrain.methods.base import accuracy
from advtrain.methods.overfitting_guard import GuardConfig, GuardedMethod
from advtrain.schema import choice, in_range, pixel

FGSM_PASSES = 1.0     # the attack step, g1 included
ALIGN_PASSES = 1.0    # g2's forward + backward with create_graph
DOUBLE_BACKWARD = 2.0  # the update's backward through g2's graph (twice that graph's one pass)
UPDATE_PASSES = 1.0


def alignment(g1: Tensor, g2: Tensor) -> tuple[Tensor, Tensor]:
    """(1 - mean cosine, mean cosine) over the examples where neither gradient is zero, as train.py's grads_nnz_idx,
    without boolean indexing (no device sync) and without a NaN gradient from a zero norm."""
    g1, g2 = g1.flatten(1).float(), g2.flatten(1).float()
    sq1, sq2 = (g1 ** 2).sum(1), (g2 ** 2).sum(1)
    keep = (sq1 != 0) & (sq2 != 0)
    # A zero row's norm is replaced by 1 before the sqrt: the sqrt's infinite slope at 0 would turn into NaN.
    n1, n2 = torch.where(keep, sq1, 1.0).sqrt(), torch.where(keep, sq2, 1.0).sqrt()
    cos = ((g1 / n1[:, None]) * (g2 / n2[:, None])).sum(1)
    kept = keep.sum()
    mean_cos = torch.where(keep, cos, 0.0).sum() / kept.clamp_min(1)
    return torch.where(kept > 0, 1.0 - mean_cos, 0.0), mean_cos


class GradAlign(GuardedMethod):
    compilable = False  # torch.compile does not differentiate through a create_graph gradient (double backward)

    @dataclass
    class Config(GuardConfig):  # the guard: off by default, as GradAlign is its own remedy
        eps: Any = pixel("${dataset.eps}")
        alpha_factor: float = 1.25  # FGSM step = alpha_factor * eps, then clamped to the ball (their --fgsm_alpha)
        # none: FGSM from x (their GradAlign runs, attack_init=zero); uniform: FGSM-RS (attack_init=random)
        start: str = choice("none", "uniform", "uniform_raw")
        bn: str = choice("train", "eval", "keep")  # BN mode of the FGSM step and of g2's forward (theirs: train)
        grad_align_lambda: float = in_range(0, None, 0.2, what="the GradAlign weight lambda")

    def setup(self, ctx):
        if ctx.dist.enabled:
            raise ConfigError("method=gradalign backpropagates through an input gradient, which DDP's gradient "
                              "all-reduce does not support: run it with trainer.devices=1")

    def train_step(self, batch, ctx):
        c, eps, x, y = self.cfg, self.threat.eps, batch.x, batch.y
        grads = []
        x_adv = pgd(ctx.attack_model, x, y, eps=eps, alpha=c.alpha_factor * eps, steps=1, start=c.start,
                    bn=c.bn, counter=ctx.counter, last_grad=grads.append)  # counts FGSM_PASSES
        logits = ctx.model(x_adv)
        ce = F.cross_entropy(logits, y)
        metrics = {}
        if c.grad_align_lambda > 0:
            reg, cos = self.regulariser(ctx, x, y, grads[0].detach())
            metrics = {"grad_align": reg.detach(), "grad_cos": cos.detach()}
            loss = ce + reg
            ctx.counter.add(len(y), ALIGN_PASSES + DOUBLE_BACKWARD)
        else:
            loss = ce
            metrics = {"grad_align": torch.zeros((), device=x.device)}
        ctx.update(loss)
        ctx.counter.add(len(y), UPDATE_PASSES)
        return {"loss": loss.detach(), "acc": accuracy(logits, y), **metrics}

    def regulariser(self, ctx, x: Tensor, y: Tensor, g1: Tensor) -> tuple[Tensor, Tensor]:
        """lambda * (1 - mean cos(g1, g2)) with g2 in the graph, and the mean cosine."""
        c = self.cfg
        # x + eta with eta ~ U(-eps, eps), not clamped to [0,1] (utils.get_input_grad feeds model(X + delta)).
        point = random_init(x.detach(), self.threat.eps, "linf", "uniform_raw").requires_grad_(True)
        with bn_mode(ctx.attack_model, c.bn):
            (g2,) = torch.autograd.grad(F.cross_entropy(ctx.attack_model(point), y), point, create_graph=True)
        term, cos = alignment(g1, g2)
        return c.grad_align_lambda * term, cos
