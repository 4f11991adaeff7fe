"""FGSM-RS, "Fast is better than free" (Wong, Rice & Kolter 2020, arXiv 2001.03994).

Per batch: delta ~ U(-eps, eps); one input-gradient step of alpha = alpha_factor * eps (1.25 eps in the paper);
one update on CE(f(x + delta)). Cost: 2 passes per example. The random start is not clamped to the image box
before the gradient step, as in the paper's MNIST code; `start=uniform` clamps it, as its CIFAR code does.

The paper's catastrophic-overfitting guard (its code's `--early-stop`) is on by default
(advtrain.methods.overfitting_guard).
"""
from dataclasses import dataclass
from typing import Any

from advtrain.attacks import pgd
from advtrain.methods.base import cross_entropy_update
from advtrain.methods.overfitting_guard import GuardConfig, GuardedMethod
from advtrain.schema import choice, pixel


class FGSMRS(GuardedMethod):

    @dataclass
    class Config(GuardConfig):
        eps: Any = pixel("${dataset.eps}")
        alpha_factor: float = 1.25   # FGSM step = alpha_factor * eps
        # uniform_raw: Wong's MNIST code (the start not clamped to [0,1]); uniform: their CIFAR code
        start: str = choice("uniform", "uniform_raw", "none", default="uniform_raw")
        bn: str = choice("eval", "train", "keep", default="train")  # the reference attacks in train mode
        guard: bool = True           # the paper's code stops at catastrophic overfitting

    def train_step(self, batch, ctx):
        c, eps = self.cfg, self.threat.eps
        x_adv = pgd(ctx.attack_model, batch.x, batch.y, eps=eps, alpha=c.alpha_factor * eps, steps=1,
                    start=c.start, bn=c.bn, counter=ctx.counter)
        return cross_entropy_update(ctx, x_adv, batch.y)
