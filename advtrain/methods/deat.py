"""DEAT / M-DEAT, dynamic efficient adversarial training (Wang et al. 2021, arXiv 2103.03076; code
github wangaxe/DEAT).

FREE-style replays with a fresh start per minibatch: delta ~ U(-tau, tau), projected into the image box; then r
replays, each ONE pass: an update on CE(f(x + delta)) and delta <- Proj(delta + alpha * sign(grad_delta)) from the
same backward (advtrain.methods.replay, shared with FREE). r grows between epochs by `rule`
(advtrain.methods.schedules): fixed (DEAT-d), accuracy (DEAT-p) or magnitude (M-DEAT, the default).
Cost: r passes per example in an epoch that runs r replays.

    advtrain experiment=cifar10_mdeat_preact18                 # M-DEAT, the authors' 50-epoch setting
    advtrain method=deat method.rule=fixed dataset=mnist       # DEAT-d: one more replay every 3 epochs, up to 5

G (the magnitude rule's statistic) sums |grad_delta| of each minibatch's last replay over the epoch, per example
(the update's gradient is of the batch mean, so it is scaled by the batch size) and unscaled by fp16 loss scaling.
Every epoch logs the replays it ran, its G and the threshold G was compared with (method/replays, method/G,
method/threshold): row t's replays grow in row t + 1 exactly when G_t > threshold_t (from epoch 2 on).
`carry=true` keeps delta across minibatches instead (FREE's buffer): with rule=fixed, replays = r_max = m and
alpha = eps, DEAT performs exactly FREE-m's updates (tested).
"""
from dataclasses import dataclass
from typing import Any, Optional

import torch

from advtrain.attacks import random_init
from advtrain.errors import ConfigError
from advtrain.schema import MethodConfig, choice, count, in_range, pixel
from advtrain.methods.base import Method
from advtrain.methods.replay import carried_buffer, replay
from advtrain.methods.schedules import AccuracyRule, FixedRule, GradMagnitude, MagnitudeRule, Rule

R_MAX = {"fixed": 5, "accuracy": 4, "magnitude": 8}  # the paper's cap for each rule


class DEAT(Method):

    @dataclass
    class Config(MethodConfig):
        eps: Any = pixel("${dataset.eps}")
        alpha: Any = pixel(None)       # delta step per replay; None = 1.25 eps (the standard setting's 10/255 at 8/255)
        tau: Any = pixel(None)         # start radius, delta ~ U(-tau, tau); None = eps (8/255 in the paper)
        carry: bool = False            # keep delta across minibatches (FREE's buffer) instead of a fresh start
        rule: str = choice("fixed", "accuracy", "magnitude", default="magnitude")  # DEAT-d | DEAT-p | M-DEAT
        replays: int = count(1, what="the replays per minibatch")  # r in the first epoch
        # most replays; None = the rule's published cap: fixed 5, accuracy 4, magnitude 8
        r_max: Optional[int] = count(None, what="the replays per minibatch")
        d: int = count(3, what="a number of epochs")  # fixed: epochs between extra replays
        p: float = in_range(0, 1, 0.4, what="a training accuracy (fraction)")  # accuracy: above which r grows
        gamma: float = 1.01            # magnitude: threshold = gamma * G of the epoch that last raised r

    def __init__(self, cfg, info):
        super().__init__(cfg, info)
        self.rule = build_rule(cfg)
        self.grad_mag = GradMagnitude()
        self.delta: torch.Tensor | None = None  # carry=true only

    def train_step(self, batch, ctx):
        x, y = batch.x, batch.y
        n, c, t = len(y), self.cfg, self.threat
        step = 1.25 * t.eps if t.alpha is None else t.alpha
        out = replay(ctx, x, y, self._start(x), replays=self.rule.count, step=step, eps=t.eps)
        if c.carry:
            self.delta[:n] = out.delta
        self.grad_mag.add(out.grad, scale=n)  # per-example gradients: the update's loss is the batch mean
        # The last replay's loss and accuracy, as the authors log them (and what DEAT-p's rule reads).
        return {"loss": out.last_loss, "acc": out.last_acc}

    def _start(self, x: torch.Tensor) -> torch.Tensor:
        if not self.cfg.carry:
            tau = self.threat.eps if self.threat.tau is None else self.threat.tau
            return random_init(x, tau, "linf", "uniform") - x  # projected into the box, as the authors' code does
        self.delta = carried_buffer(self.delta, x)
        return self.delta[:len(x)]

    def epoch_end(self, ctx, metrics):
        g = self.grad_mag.read(ctx.dist)  # every rank calls epoch_end: the sum over ranks agrees everywhere
        used, threshold = self.rule.count, self.rule.threshold
        self.rule.after_epoch(ctx.epoch, acc=metrics["acc"], g=g)
        return {"replays": float(used), "G": g, **({} if threshold is None else {"threshold": threshold})}

    def state_dict(self):
        return {"rule": self.rule.state_dict(), "G": self.grad_mag.state_dict(), "delta": self.delta}

    def load_state_dict(self, state):
        self.rule.load_state_dict(state["rule"])
        self.grad_mag.load_state_dict(state["G"])
        self.delta = state["delta"]


def build_rule(cfg) -> Rule:
    most = R_MAX[cfg.rule] if cfg.r_max is None else cfg.r_max
    if not 1 <= cfg.replays <= most:
        raise ConfigError(f"method.replays={cfg.replays} and method.r_max={most}: need 1 <= replays <= r_max")
    if cfg.rule == "fixed":
        if cfg.d < 1:
            raise ConfigError(f"method.d={cfg.d} must be >= 1 (epochs between extra replays)")
        return FixedRule(cfg.replays, most, cfg.d)
    if cfg.rule == "accuracy":
        return AccuracyRule(cfg.replays, most, cfg.p)
    return MagnitudeRule(cfg.replays, most, cfg.gamma)
