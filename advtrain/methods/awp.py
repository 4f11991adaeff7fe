"""AWP, adversarial weight perturbation (Wu, Xia & Wang, NeurIPS 2020, arXiv 2004.05884; code github csdongxian/AWP),
over a base method: PGD-AT (AT-AWP) or TRADES (TRADES-AWP).

Per batch: the base method makes x_adv as usual. The ascent direction of the base loss in weight space is taken on
the plain model in train mode (the authors' proxy copy, whose one SGD step's length cancels out below; its BN
statistics are not kept); each weight tensor with more than one dimension gets

    v_l = gamma * ||w_l|| / ||g_l|| * g_l          (g_l: the base loss's gradient for w_l, ascent)

The update's gradient of the base loss is taken at w + v; the weights are then restored exactly (saved, not
subtracted, so no rounding drifts in) and the optimizer steps: they move as if trained at their locally worst
neighbour. Until `warmup_epochs` have run, the step is the base method's alone. gamma is a radius of the threat model
in weight space, so the trainer's ε warm-up (trainer.eps_warmup, the MNIST recipe's) ramps it with ε: at MNIST's
ε = 0.3 a full-size weight perturbation from the first update keeps a short run at chance (docs/methods/rat.md
has the numbers). Without an ε warm-up (the authors' CIFAR recipes) nothing changes.

Cost: the base method's, plus the ascent's forward and backward on the base loss (1 pass for PGD-AT, 2 for TRADES'
clean and adversarial halves). With several ranks each rank takes the ascent on its own shard (no all-reduce): the
update's gradient is averaged as usual, so the replicas stay identical.
"""
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from advtrain.methods.base import Method, accuracy, config_of
from advtrain.methods.pgd import PGDAT
from advtrain.methods.trades import TRADES, trades_terms
from advtrain.schema import MethodConfig, attack_steps, choice, count, pixel

GAMMA = {"pgd": 0.01, "trades": 0.005}   # the authors' AT-AWP and TRADES-AWP scripts
WARMUP_EPOCHS = {"pgd": 0, "trades": 10}  # TRADES-AWP starts perturbing at epoch 10 (of 200)


class WeightPerturbation:
    """v for each weight tensor with more than one dimension, from the ascent gradient of a loss."""

    def __init__(self, model: nn.Module, gamma: float):
        self.model, self.gamma = model, gamma
        self.params = [p for p in model.parameters() if p.dim() > 1 and p.requires_grad]

    def compute(self, loss_of: Any, scale: float = 1.0) -> list[Tensor]:
        """v for the loss loss_of(model) (the base loss, model in train mode), pointing up its gradient: the weights'
        locally worst neighbour, at `scale` times gamma (the ε warm-up's factor). (The authors' proxy takes an SGD
        step on -loss: the same direction.) BN statistics are left as they were."""
        buffers = [b.detach().clone() for b in self.model.buffers()]
        training = self.model.training
        self.model.train()
        try:
            grads = torch.autograd.grad(loss_of(self.model), self.params)
        finally:
            self.model.train(training)
            with torch.no_grad():
                for b, saved in zip(self.model.buffers(), buffers):
                    b.copy_(saved)
        gamma = self.gamma * scale
        return [gamma * p.detach().norm() / (g.norm() + 1e-20) * g for p, g in zip(self.params, grads)]

    @contextmanager
    def applied(self, diffs: list[Tensor]) -> Iterator[None]:
        """The weights at w + v inside; exactly w again after."""
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, d in zip(self.params, diffs):
                p.add_(d.to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for p, w in zip(self.params, saved):
                    p.copy_(w)


class AWP(Method):
    @dataclass
    class Config(MethodConfig):
        base: str = choice("pgd", "trades")
        eps: Any = pixel("${dataset.eps}")
        alpha: Any = pixel("${dataset.pgd_alpha}")  # the base attack's step size
        steps: int = attack_steps("${dataset.pgd_steps}", zero="clean inputs")  # the base attack's steps
        start: str = choice("uniform", "uniform_raw", "none")  # PGD-AT's random start
        beta: float = 6.0             # TRADES' weight of the KL term
        init_std: float = 0.001       # TRADES' Gaussian start
        bn: str = choice("eval", "train", "keep")  # BN mode while attacking
        gamma: Optional[float] = None  # perturbation size relative to each layer's norm (null: 0.01 AT, 0.005 TRADES)
        # epochs of the base method alone first (null: 0 AT, 10 TRADES)
        warmup_epochs: Optional[int] = count(None, low=0, what="a number of epochs")

    def __init__(self, cfg, info):
        super().__init__(cfg, info)
        self.base = self.share_threat(_base(cfg, info))  # one threat model: the ε warm-up ramps both
        self.gamma = cfg.gamma if cfg.gamma is not None else GAMMA[cfg.base]
        self.warmup = cfg.warmup_epochs if cfg.warmup_epochs is not None else WARMUP_EPOCHS[cfg.base]

    def setup(self, ctx):
        self.base.setup(ctx)
        self.perturbation = WeightPerturbation(ctx.attack_model, self.gamma)

    def train_step(self, batch, ctx):
        if ctx.epoch < self.warmup:
            return self.base.train_step(batch, ctx)
        x, y, n = batch.x, batch.y, len(batch.y)
        if isinstance(self.base, TRADES):
            x_adv = self.base.adversarial(batch, ctx.attack_model, ctx.counter)

            def base_loss(model, with_logits=False):
                logits_clean, logits_adv = self.base.forward_pair(model, x, x_adv)
                natural, robust = trades_terms(logits_clean, logits_adv, y)
                loss = natural + self.cfg.beta * robust
                return (loss, logits_clean) if with_logits else loss

            halves = 2
        else:
            start = self.base.cfg.start if self.base.steps > 0 else "none"
            x_adv = self.base.attack(ctx.attack_model, ctx.counter, x, y, start=start)

            def base_loss(model, with_logits=False):
                logits = model(x_adv)
                loss = F.cross_entropy(logits.float(), y)
                return (loss, logits) if with_logits else loss

            halves = 1
        diffs = self.perturbation.compute(base_loss, self.threat.scale)  # up the base loss's gradient
        with self.perturbation.applied(diffs):
            loss, logits = base_loss(ctx.model, with_logits=True)
            ctx.backward(loss)
        ctx.step()  # on the restored weights, with the gradient taken at the perturbed ones
        ctx.counter.add(n, 2 * halves)  # the ascent's pass(es), then the update's
        return {"loss": loss.detach(), "acc": accuracy(logits, y)}

    def epoch_end(self, ctx, metrics):
        return self.base.epoch_end(ctx, metrics)

    def state_dict(self):
        return self.base.state_dict()

    def load_state_dict(self, state):
        self.base.load_state_dict(state)


def _base(cfg, info) -> Method:
    """The base method, built from AWP's settings; every other setting of the base at its own default (a knob the
    base gains later is then simply at its default here)."""
    if cfg.base == "trades":
        return TRADES(config_of(TRADES, name="trades", eps=cfg.eps, alpha=cfg.alpha, steps=cfg.steps, beta=cfg.beta,
                                init_std=cfg.init_std, bn=cfg.bn, forward="auto"), info)
    return PGDAT(config_of(PGDAT, name="pgd", eps=cfg.eps, alpha=cfg.alpha, steps=cfg.steps, start=cfg.start,
                           bn=cfg.bn), info)

