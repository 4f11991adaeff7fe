"""PGD-AT (Madry et al. 2018, arXiv 1706.06083): train on the worst case PGD finds inside the eps-ball.

Per batch: delta_0 ~ U(-eps, eps); `steps` times delta <- Proj(delta + alpha * sign(grad_delta CE)); one update on
CE(f(x + delta)). The attack takes input-only gradients through the plain module, with BN in `bn` mode.
`adv_weight` = lambda < 1 trains on (1 - lambda) CE(f(x)) + lambda CE(f(x + delta)), one forward of both halves: the
fixed-lambda PGD-AT that OAT's paper compares each of its lambdas with (the authors' PGDAT, `--Lambda`); lambda = 0
is natural training, with no attack run.
Cost: steps + 1 passes per example (steps + 2 with 0 < adv_weight < 1; 1 at 0). steps_schedule=magnitude grows K during training from 0 (clean training) up to
`steps`, by DEAT's magnitude rule (advtrain.methods.steps_schedule.StepsMethod).
"""
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F

from advtrain.errors import ConfigError
from advtrain.schema import MethodConfig, attack_steps, choice, pixel
from advtrain.methods.base import accuracy, cross_entropy_update
from advtrain.methods.steps_schedule import StepsMethod


class PGDAT(StepsMethod):

    @dataclass
    class Config(MethodConfig):
        eps: Any = pixel("${dataset.eps}")  # L-inf radius, [0,1] pixel units
        alpha: Any = pixel("${dataset.pgd_alpha}")  # step size, pixel units
        # K attack steps per batch; under steps_schedule=magnitude the most K grows to
        steps: int = attack_steps("${dataset.pgd_steps}", zero="clean training")
        start: str = choice("uniform", "uniform_raw", "none")
        bn: str = choice("eval", "train", "keep")  # BN mode while attacking
        steps_schedule: str = choice("none", "magnitude")  # magnitude: M+, K = 0, 1, ... grows by G, up to steps
        gamma: float = 1.01          # steps_schedule=magnitude: threshold = gamma * G of the last increase
        adv_weight: float = 1.0      # lambda: (1 - lambda) CE(clean) + lambda CE(adversarial); 1: Madry et al.

    def __init__(self, cfg, info):
        super().__init__(cfg, info)
        if not 0 <= cfg.adv_weight <= 1:
            raise ConfigError(f"method.adv_weight={cfg.adv_weight}: expected a weight in [0, 1] (1: PGD-AT's loss)")

    def train_step(self, batch, ctx):
        lam, x, y = self.cfg.adv_weight, batch.x, batch.y
        if lam == 0:
            return cross_entropy_update(ctx, x, y)
        x_adv = self.attack(ctx.attack_model, ctx.counter, x, y, start=self.cfg.start if self.steps > 0 else "none")
        if lam == 1:
            return cross_entropy_update(ctx, x_adv, y)
        logits = ctx.model(torch.cat([x, x_adv])).float()
        clean, adv = logits[: len(y)], logits[len(y):]
        loss = (1 - lam) * F.cross_entropy(clean, y) + lam * F.cross_entropy(adv, y)
        ctx.update(loss)
        ctx.counter.add(len(y), 2)
        return {"loss": loss.detach(), "acc": accuracy(adv, y)}
