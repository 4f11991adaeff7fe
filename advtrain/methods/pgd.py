"""PGD-AT (Madry et al. 2018, arXiv 1706.06083): train on the worst case PGD finds inside the eps-ball.

Per batch: delta_0 ~ U(-eps, eps); `steps` times delta <- Proj(delta + alpha * sign(grad_delta CE)); one update on
CE(f(x + delta)). The attack takes input-only gradients through the plain module, with BN in `bn` mode.
Cost: steps + 1 passes per example.
"""
from dataclasses import dataclass
from typing import Any

from torch import nn

from advtrain.attacks import pgd
from advtrain.config import pixel
from advtrain.methods.base import Method, accuracy


class PGDAT(Method):
    name = "pgd"

    @dataclass
    class Config:
        name: str = "pgd"
        eps: Any = pixel()           # L-inf radius, [0,1] pixel units
        alpha: Any = pixel()         # step size, pixel units
        steps: int = 10              # K attack steps per batch
        start: str = "uniform"       # uniform | none
        bn: str = "eval"             # BN mode while attacking: eval | train

    def __init__(self, cfg, info):
        super().__init__(cfg, info)
        # A schedule (DEAT's magnitude rule) may change the step count between epochs, so it is state, not config.
        self.steps = cfg.steps

    def train_step(self, batch, ctx):
        c = self.cfg
        x_adv = pgd(ctx.attack_model, batch.x, batch.y, eps=c.eps, alpha=c.alpha, steps=self.steps,
                    start=c.start if self.steps > 0 else "none", bn=c.bn, counter=ctx.counter)
        logits = ctx.model(x_adv)
        loss = nn.functional.cross_entropy(logits, batch.y)
        ctx.update(loss)
        ctx.counter.add(len(batch.y), 1)
        return {"loss": loss.detach(), "acc": accuracy(logits, batch.y)}

    def epoch_end(self, ctx, metrics):
        return {"attack_steps": float(self.steps)}

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.steps = int(state["steps"])
