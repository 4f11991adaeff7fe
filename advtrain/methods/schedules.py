"""Attack-budget schedules: how many replays (DEAT) or attack steps (the "M+" methods) the next epoch runs.

DEAT (Wang et al. 2021, arXiv 2103.03076; code github wangaxe/DEAT) grows its budget during training by one of
three rules, each decided once per epoch, after it ends (t counts epochs from 0):

- FixedRule, DEAT-d:      r_t = min(r_0 + floor(t / d), r_max)
- AccuracyRule, DEAT-p:   r += 1 after an epoch whose training accuracy exceeds p, up to r_max
- MagnitudeRule, M-DEAT:  after epoch 0, r += 1; after epoch 1, thr = gamma * G_1; after each later epoch t,
                          if G_t > thr and r < r_max: thr = gamma * G_t, r += 1.
                          G_t: the sum over the epoch's examples of |grad_delta| at the last replay / attack step.

The magnitude rule is a scheduler, not a method: PGD-AT and TRADES use it for their K (steps_schedule=magnitude),
starting from K = 0 and adding a coverage condition: K also grows while alpha * K < eps, since K steps of alpha
cannot reach the edge of the ball before that.

The rules are plain Python numbers, so checkpoints carry them and tests drive them by hand. GradMagnitude gathers
G_t on the device.
"""
from __future__ import annotations

import torch
from torch import Tensor


class Rule:
    """`count` is the budget the next epoch runs; `after_epoch` updates it from the epoch that just ended."""

    threshold: float | None = None  # only the magnitude rule has one

    def __init__(self, start: int, most: int):
        self.start, self.most = start, most
        self.count = min(start, most)

    def after_epoch(self, epoch: int, *, acc: float, g: float) -> int:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {"count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.count = int(state["count"])


class FixedRule(Rule):
    """DEAT-d: one more replay every d epochs."""

    def __init__(self, start: int, most: int, d: int):
        super().__init__(start, most)
        self.d = d

    def after_epoch(self, epoch, *, acc=None, g=None):
        self.count = min(self.start + (epoch + 1) // self.d, self.most)
        return self.count


class AccuracyRule(Rule):
    """DEAT-p: one more replay after an epoch whose training accuracy (a fraction) exceeds p."""

    def __init__(self, start: int, most: int, p: float):
        super().__init__(start, most)
        self.p = p

    def after_epoch(self, epoch, *, acc, g=None):
        if acc > self.p and self.count < self.most:
            self.count += 1
        return self.count


class MagnitudeRule(Rule):
    """M-DEAT's gradient-magnitude rule; with alpha and eps (the M+ use) also the coverage condition."""

    def __init__(self, start: int, most: int, gamma: float, alpha: float | None = None, eps: float | None = None):
        super().__init__(start, most)
        self.gamma, self.alpha, self.eps = gamma, alpha, eps
        self.threshold = None

    def short_of_the_edge(self) -> bool:
        """alpha * K < eps: K steps cannot reach the edge of the ball (a relative 1e-9 absorbs rounding, so that
        4 steps of 2/255 count as reaching 8/255, as the authors' integer arithmetic has it)."""
        return self.alpha is not None and self.alpha * self.count < self.eps * (1 - 1e-9)

    def after_epoch(self, epoch, *, g, acc=None):
        if epoch == 0:
            self.count = min(self.count + 1, self.most)
        elif epoch == 1:
            self.threshold = self.gamma * g
        elif self.count < self.most and (g > self.threshold or self.short_of_the_edge()):
            self.threshold = self.gamma * g  # re-anchored at each increase only
            self.count += 1
        return self.count

    def state_dict(self):
        return {"count": self.count, "threshold": self.threshold}

    def load_state_dict(self, state):
        self.count = int(state["count"])
        self.threshold = None if state["threshold"] is None else float(state["threshold"])


class GradMagnitude:
    """G_t: the sum of |input gradient| over an epoch. Added to on the device, so a training step never waits for
    it; read once per epoch, summed over ranks. A checkpoint taken mid-epoch carries the partial sum."""

    def __init__(self):
        self.total: Tensor | float = 0.0

    def add(self, grad: Tensor, scale: float = 1.0) -> None:
        self.total = self.total + grad.abs().sum(dtype=torch.float64) * scale

    def read(self, dist) -> float:
        """The epoch's G over all ranks (every rank must call it: it is a collective); starts the next epoch's."""
        (g,) = dist.sum([float(self.total)])
        self.total = 0.0
        return g

    def state_dict(self) -> dict:
        return {"total": float(self.total)}

    def load_state_dict(self, state: dict) -> None:
        self.total = float(state["total"])
