"""TRADES (Zhang et al. 2019, arXiv 1901.08573): trade clean accuracy for smoothness inside the eps-ball.

Attack (BN eval): x' = x + 0.001 N(0, I); `steps` times x' <- Proj(x' + eta sign(grad KL(p(x) || p(x')))), with
p(x) computed once. Loss (BN train): CE(f(x), y) + beta KL(p(x) || p(x')), batch mean.
Cost: steps attack passes + 1/3 (the clean forward for p(x)) + 2 (clean and adversarial halves of the update).
With steps = 0 (the first epoch under steps_schedule=magnitude) x' = x, the KL term and its gradient vanish, and
the step is one clean CE update: 1 pass.

The update's forward: `separate` runs f(x) and f(x') as two forwards, as the reference code does, so BN (train mode)
normalises each half with its own statistics; `joint` runs one forward on the concatenated batch, which DDP needs
(one forward per backward). `auto` is separate on one device and joint on several; the two agree exactly on models
without BN.
"""
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F

from advtrain.attacks import bn_mode
from advtrain.schema import MethodConfig, attack_steps, choice, pixel
from advtrain.methods.base import accuracy, cross_entropy_update
from advtrain.methods.steps_schedule import StepsMethod


class TRADES(StepsMethod):

    @dataclass
    class Config(MethodConfig):
        eps: Any = pixel("${dataset.eps}")
        alpha: Any = pixel("${dataset.pgd_alpha}")  # eta, the attack step size
        # K; under steps_schedule=magnitude the most K grows to
        steps: int = attack_steps("${dataset.pgd_steps}", zero="clean training")
        beta: float = 6.0            # weight of the robustness (KL) term
        init_std: float = 0.001      # std of the Gaussian start, pixel units
        bn: str = choice("eval", "train", "keep")
        forward: str = choice("auto", "separate", "joint")  # the update's forward(s), see above
        steps_schedule: str = choice("none", "magnitude")  # magnitude: M+, K = 0, 1, ... grows by G, up to steps
        gamma: float = 1.01          # steps_schedule=magnitude: threshold = gamma * G of the last increase

    def setup(self, ctx):
        if self.cfg.forward == "separate" and ctx.dist.enabled:
            from advtrain.errors import ConfigError

            raise ConfigError("method.forward=separate needs one device: DDP allows one forward per backward; use "
                              "method.forward=joint (or auto) with trainer.devices > 1")
        self.joint = self.cfg.forward == "joint" or (self.cfg.forward == "auto" and ctx.dist.enabled)

    def train_step(self, batch, ctx):
        n = len(batch.y)
        if self.steps == 0:
            out = cross_entropy_update(ctx, batch.x, batch.y)
            return {**out, "robust_kl": torch.zeros((), device=batch.x.device)}
        x_adv = self.adversarial(batch, ctx.attack_model, ctx.counter)
        logits_clean, logits_adv = self.forward_pair(ctx.model, batch.x, x_adv)
        natural, robust = trades_terms(logits_clean, logits_adv, batch.y)
        loss = natural + self.cfg.beta * robust
        ctx.update(loss)
        ctx.counter.add(n, 2)
        return {"loss": loss.detach(), "acc": accuracy(logits_clean, batch.y), "robust_kl": robust.detach()}

    def adversarial(self, batch, model, counter):
        """TRADES' inner maximisation on `model` (the attacking model: the plain one, or a noisy copy)."""
        with torch.no_grad(), bn_mode(model, self.cfg.bn):
            p_clean = F.softmax(model(batch.x).float(), dim=1)
        counter.add(len(batch.y), 1 / 3)
        # TRADES' start, x + init_std N(0, I) (std in pixel units; the draw random_init's 'normal' start makes).
        start = batch.x + self.cfg.init_std * torch.randn_like(batch.x)
        return self.attack(model, counter, batch.x, batch.y, loss="kl", target=p_clean, init=start)

    def forward_pair(self, model, x, x_adv, **kwargs):
        """The update's forward(s) on the clean and adversarial halves: (clean out, adversarial out), each logits or
        (logits, features) with features=... in kwargs."""
        if self.joint:
            out = model(torch.cat([x, x_adv]), **kwargs)
            return _split(out, len(x))
        return model(x, **kwargs), model(x_adv, **kwargs)


def trades_terms(logits_clean, logits_adv, y):
    """(CE on the clean half, KL(p(x) || p(x')) batch mean): TRADES' natural and robustness terms, in fp32."""
    logits_clean, logits_adv = logits_clean.float(), logits_adv.float()
    natural = F.cross_entropy(logits_clean, y)
    robust = F.kl_div(F.log_softmax(logits_adv, 1), F.softmax(logits_clean, 1), reduction="batchmean")
    return natural, robust


def _split(out, n: int):
    if isinstance(out, tuple):
        halves = [t.split(n) for t in out]
        return tuple(h[0] for h in halves), tuple(h[1] for h in halves)
    return out.split(n)
