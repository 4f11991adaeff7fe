"""PGD-AT (Madry et al. 2018, arXiv 1706.06083): train on the worst case PGD finds inside the eps-ball.

Per batch: delta_0 ~ U(-eps, eps); `steps` times delta <- Proj(delta + alpha * sign(grad_delta CE)); one update on
CE(f(x + delta)). The attack takes input-only gradients through the plain module, with BN in `bn` mode.
Cost: steps + 1 passes per example. steps_schedule=magnitude grows K during training from 0 (clean training) up to
`steps`, by DEAT's magnitude rule (advtrain.methods.base.StepsMethod).
"""
from dataclasses import dataclass
from typing import Any

from advtrain.schema import MethodConfig, choice, pixel
from advtrain.methods.base import StepsMethod, cross_entropy_update


class PGDAT(StepsMethod):

    @dataclass
    class Config(MethodConfig):
        eps: Any = pixel()           # L-inf radius, [0,1] pixel units
        alpha: Any = pixel()         # step size, pixel units
        steps: int = 10              # K attack steps per batch; under steps_schedule=magnitude the most K grows to
        start: str = choice("uniform", "uniform_raw", "none")
        bn: str = choice("eval", "train", "keep")  # BN mode while attacking
        steps_schedule: str = choice("none", "magnitude")  # magnitude: M+, K = 0, 1, ... grows by G, up to steps
        gamma: float = 1.01          # steps_schedule=magnitude: threshold = gamma * G of the last increase

    def train_step(self, batch, ctx):
        x_adv = self.attack(ctx, batch.x, batch.y, start=self.cfg.start if self.steps > 0 else "none")
        return cross_entropy_update(ctx, x_adv, batch.y)
