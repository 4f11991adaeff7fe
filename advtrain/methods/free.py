"""FREE-AT, "Adversarial training for free!" (Shafahi et al. 2019, arXiv 1904.12843).

One perturbation buffer delta lives across minibatches (never reset). Each minibatch is replayed `replays` (m)
times; every replay is ONE pass whose backward yields both the weight gradient (for the update) and the input
gradient (for delta <- Proj(delta + eps * sign(grad_delta))). `trainer.epochs` counts passes over the data, so run
T/m epochs to spend what T epochs of natural training cost. The LR schedule follows training progress, so its
shape over the run is the paper's, whose schedule counts replays.
Cost: m passes per example per epoch.

The buffer is as large as a full batch; a smaller last batch uses its first rows. The replays are the engine DEAT
shares (advtrain.methods.replay): they go through the update's forward, so BN is in train mode while attacking (the
method's definition, not a setting).
"""
from dataclasses import dataclass
from typing import Any

import torch

from advtrain.schema import count, pixel
from advtrain.methods.overfitting_guard import GuardConfig, GuardedMethod
from advtrain.methods.replay import carried_buffer, replay


class FreeAT(GuardedMethod):

    @dataclass
    class Config(GuardConfig):  # the guard: off by default, as the paper
        eps: Any = pixel("${dataset.eps}")
        replays: int = count(8, what="the updates per minibatch")  # m: updates per minibatch
        step: Any = pixel(None)      # delta step per replay; None = eps, as in the paper

    def __init__(self, cfg, info):
        super().__init__(cfg, info)
        self.delta: torch.Tensor | None = None

    def train_step(self, batch, ctx):
        x, y = batch.x, batch.y
        n, eps = len(y), self.threat.eps
        step = eps if self.threat.step is None else self.threat.step
        self.delta = carried_buffer(self.delta, x)
        out = replay(ctx, x, y, self.delta[:n], replays=self.cfg.replays, step=step, eps=eps)
        self.delta[:n] = out.delta
        return {"loss": out.loss, "acc": out.acc}

    def state_dict(self):
        return {**super().state_dict(), "delta": self.delta}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.delta = state["delta"]
