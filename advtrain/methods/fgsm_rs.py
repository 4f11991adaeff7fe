"""FGSM-RS, "Fast is better than free" (Wong, Rice & Kolter 2020, arXiv 2001.03994).

Per batch: delta ~ U(-eps, eps); one input-gradient step of alpha = alpha_factor * eps (1.25 eps in the paper);
one update on CE(f(x + delta)). Cost: 2 passes per example. The random start is not clamped to the image box
before the gradient step, as in the paper's MNIST code; `start=uniform` clamps it, as its CIFAR code does.

Catastrophic-overfitting guard (the paper's code, `--early-stop`): after each epoch, PGD accuracy on a fixed
training minibatch; when it falls by more than `guard_drop` below the previous epoch's, training stops and the
weights of the last good epoch are restored. The guard's PGD uses alpha = 2.5 eps / guard_steps so it reaches
the edge of the ball on any dataset (the paper's CIFAR setting, 5 steps of 2/255 at eps 8/255, is as strong).
The guard always attacks at the full eps, also during trainer.eps_warmup: epoch to epoch it must compare one threat
model, or the growing eps of the warm-up reads as a collapse.
"""
from dataclasses import dataclass
from typing import Any

import torch

from advtrain.attacks import bn_mode, pgd
from advtrain.schema import MethodConfig, attack_steps, choice, count, in_range, pixel
from advtrain.methods.base import Method, copy_weights, cross_entropy_update


class FGSMRS(Method):

    @dataclass
    class Config(MethodConfig):
        eps: Any = pixel()
        alpha_factor: float = 1.25   # FGSM step = alpha_factor * eps
        # uniform_raw: Wong's MNIST code (the start not clamped to [0,1]); uniform: their CIFAR code
        start: str = choice("uniform", "uniform_raw", "none", default="uniform_raw")
        bn: str = choice("eval", "train", "keep", default="train")  # the reference attacks in train mode
        guard: bool = True           # catastrophic-overfitting guard
        guard_n: int = count(512, what="a number of examples")  # examples in the fixed training minibatch
        guard_steps: int = attack_steps(5)
        # stop when PGD accuracy falls by more than this (fraction)
        guard_drop: float = in_range(0, 1, 0.2, what="a drop in accuracy (fraction)")

    def __init__(self, cfg, info):
        super().__init__(cfg, info)
        self.prev_robust_acc = 0.0
        self.good_weights: dict | None = None

    def train_step(self, batch, ctx):
        c = self.cfg
        x_adv = pgd(ctx.attack_model, batch.x, batch.y, eps=c.eps, alpha=c.alpha_factor * c.eps, steps=1,
                    start=c.start, bn=c.bn, counter=ctx.counter)
        return cross_entropy_update(ctx, x_adv, batch.y)

    def epoch_end(self, ctx, metrics):
        c = self.full_cfg
        if not c.guard:
            return {}
        model = ctx.attack_model
        x, y = ctx.fixed_batch(c.guard_n)
        # Not counted in passes per example: like evaluation, the guard watches training (its time is counted).
        x_adv = pgd(model, x, y, eps=c.eps, alpha=2.5 * c.eps / c.guard_steps, steps=c.guard_steps,
                    start="uniform", bn="eval")
        with torch.no_grad(), bn_mode(model, "eval"), ctx.autocast():
            robust_acc = (model(x_adv).argmax(1) == y).float().mean().item()
        robust_acc = ctx.dist.mean(robust_acc)  # every rank restores (or not) alike, or the replicas would diverge
        if robust_acc - self.prev_robust_acc < -c.guard_drop and self.good_weights is not None:
            model.load_state_dict(self.good_weights)
            ctx.request_stop("catastrophic overfitting: guard PGD accuracy fell from "
                             f"{100 * self.prev_robust_acc:.2f}% to {100 * robust_acc:.2f}%; restored the weights "
                             "of the previous epoch")
        else:
            self.prev_robust_acc = robust_acc
            self.good_weights = copy_weights(model)
        return {"guard_pgd_acc": robust_acc}

    def state_dict(self):
        return {"prev_robust_acc": self.prev_robust_acc, "good_weights": self.good_weights}

    def load_state_dict(self, state):
        self.prev_robust_acc = float(state["prev_robust_acc"])
        self.good_weights = state["good_weights"]
