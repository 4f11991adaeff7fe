"""PGD-AT (Madry et al. 2018, arXiv 1706.06083): train on the worst case PGD finds inside the eps-ball.

Per batch: delta_0 ~ U(-eps, eps); `steps` times delta <- Proj(delta + alpha * sign(grad_delta CE)); one update on
CE(f(x + delta)). The attack takes input-only gradients through the plain module, with BN in `bn` mode.
Cost: steps + 1 passes per example.
"""
from dataclasses import dataclass
from typing import Any

from advtrain.attacks import pgd
from advtrain.schema import pixel
from advtrain.methods.base import StepsMethod, cross_entropy_update


class PGDAT(StepsMethod):
    name = "pgd"

    @dataclass
    class Config:
        name: str = "pgd"
        eps: Any = pixel()           # L-inf radius, [0,1] pixel units
        alpha: Any = pixel()         # step size, pixel units
        steps: int = 10              # K attack steps per batch
        start: str = "uniform"       # uniform | none
        bn: str = "eval"             # BN mode while attacking: eval | train

    def train_step(self, batch, ctx):
        c = self.cfg
        x_adv = pgd(ctx.attack_model, batch.x, batch.y, eps=c.eps, alpha=c.alpha, steps=self.steps,
                    start=c.start if self.steps > 0 else "none", bn=c.bn, counter=ctx.counter)
        return cross_entropy_update(ctx, x_adv, batch.y)
