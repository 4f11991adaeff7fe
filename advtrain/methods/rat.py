"""RAT, "Randomized Adversarial Training via Taylor Expansion" (Jin et al., CVPR 2023, arXiv 2303.10653; code github
Alexkael/Randomized-Adversarial-Training), as its code computes it (docs/methods/rat.md: how that differs from the
paper's story, and every choice made here).

Over TRADES (or TRADES-AWP, `base=awp_trades`): the adversarial example is TRADES' KL attack; the update's loss is

    (1 - a) CE(f(x), y) + beta KL(p(x) || p(x'))
      + a/2 [KL(q1 || p(x')) + KL(q1' || p(x))]  +  a*s [KL(q2 || p(x')) + KL(q2' || p(x))]

where the soft labels q come from the final Linear layer's weight gradient of CE on the clean and on the adversarial
batch, reduced to one value per class (first order |row sum|, second order (row sum)^2), and turned into label
smoothing: 1 - c on the true class, c spread over the others in proportion to the (min-shifted, normalised) gap
between the clean and adversarial values. The row sums have a closed form from the logits and features of the
update's own forward, (1/B) sum_i (p_ic - [c = y_i]) sum_j phi_ij: no second backward (which DDP and torch.compile
refuse). `weight_noise` adds the paper's Gaussian noise to the convolution weights of a copy the attack runs on.

Cost: the base method's (RAT's terms add no pass).
"""
import copy
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from advtrain.methods.awp import GAMMA, WARMUP_EPOCHS, WeightPerturbation
from advtrain.methods.base import Method, accuracy, config_of
from advtrain.methods.trades import TRADES, trades_terms
from advtrain.schema import MethodConfig, attack_steps, choice, count, pixel


def last_layer_row_sums(logits: Tensor, features: Tensor, y: Tensor) -> Tensor:
    """sum_j dCE/dW[c, j] for a final Linear (logits = W features + b), CE averaged over the batch: (C,)."""
    p = F.softmax(logits.float(), dim=1)
    residual = p - F.one_hot(y, p.shape[1]).to(p.dtype)
    return (residual * features.float().sum(dim=1, keepdim=True)).sum(dim=0) / len(y)


def smoothing_targets(gap: Tensor, c: float) -> Tensor:
    """(C, C): row i is the soft label of class i: 1 - c on i, c over the other classes in proportion to the
    min-shifted, normalised `gap`; uniform over them where the gap says nothing (all equal: the code's 0/0)."""
    n = gap.numel()
    v = gap.float() - gap.min()
    v = v / v.sum() if v.sum() > 0 else torch.full_like(v, 1.0 / n)
    others = v.expand(n, n).clone()
    others.fill_diagonal_(0)
    mass = others.sum(dim=1, keepdim=True)
    uniform = (1 - torch.eye(n, device=v.device)) / (n - 1)
    shares = torch.where(mass > 0, others / mass.clamp_min(1e-30), uniform)
    return c * shares + (1 - c) * torch.eye(n, device=v.device)


def smoothing_mass(num_classes: int) -> float:
    """The code's c: 0.8 for 10 classes, 0.98 for 100; 1 - 2/C reproduces both and gives every class count one."""
    return 1 - 2 / num_classes


class RAT(Method):
    @dataclass
    class Config(MethodConfig):
        base: str = choice("trades", "awp_trades")
        eps: Any = pixel("${dataset.eps}")
        alpha: Any = pixel("${dataset.pgd_alpha}")  # the attack's step size
        steps: int = attack_steps("${dataset.pgd_steps}")
        beta: float = 6.0              # TRADES' KL weight
        init_std: float = 0.001
        bn: str = choice("eval", "train", "keep")
        taylor_weight: float = 0.2     # a: the weight moved from CE to the Taylor terms
        second_order: float = 0.25     # s: the second-order terms' weight a*s (WRN scripts 1/4; PreActResNet-18: 0.2)
        second_order_targets: str = choice("as_coded", "paired")  # as_coded: q2 = q2' (the code); paired: q2 from
                                                                  # the clean-minus-adversarial gap, as q1
        smoothing: Optional[float] = None  # c (null: 1 - 2/C, i.e. the code's 0.8 for 10 classes, 0.98 for 100)
        weight_noise: float = 0.0      # std of Gaussian noise on the attacking copy's conv weights (the paper's story;
                                       # the code's TRADES script: 1e-4), 0: attack the model itself
        gamma: Optional[float] = None  # awp_trades: AWP's perturbation size (null: 0.005)
        # awp_trades: epochs before AWP starts (null: 10)
        warmup_epochs: Optional[int] = count(None, low=0, what="a number of epochs")

    def __init__(self, cfg, info):
        super().__init__(cfg, info)
        trades = {k: getattr(cfg, k) for k in ("eps", "alpha", "steps", "beta", "init_std", "bn")}
        self.trades = self.share_threat(TRADES(config_of(TRADES, name="trades", forward="auto", **trades), info))
        self.c = cfg.smoothing if cfg.smoothing is not None else smoothing_mass(info.num_classes)
        self.awp = cfg.base == "awp_trades"
        self.warmup = (cfg.warmup_epochs if cfg.warmup_epochs is not None else WARMUP_EPOCHS["trades"]) \
            if self.awp else 0

    def setup(self, ctx):
        self.trades.setup(ctx)
        gamma = self.cfg.gamma if self.cfg.gamma is not None else GAMMA["trades"]
        self.perturbation = WeightPerturbation(ctx.attack_model, gamma) if self.awp else None

    def train_step(self, batch, ctx):
        c, x, y, n = self.cfg, batch.x, batch.y, len(batch.y)
        attacker = _noisy_copy(ctx.attack_model, c.weight_noise) if c.weight_noise > 0 else ctx.attack_model
        x_adv = self.trades.adversarial(batch, attacker, ctx.counter)
        if self.perturbation is not None and ctx.epoch >= self.warmup:
            def trades_loss(model):  # TRADES-AWP's proxy loss, which the perturbation increases
                natural, robust = trades_terms(*self.trades.forward_pair(model, x, x_adv), y)
                return natural + c.beta * robust

            diffs = self.perturbation.compute(trades_loss, self.threat.scale)  # ramped with ε, as AWP's
            ctx.counter.add(n, 2)
            with self.perturbation.applied(diffs):
                out = self._update_loss(ctx.model, x, x_adv, y)
                ctx.backward(out["loss"])
        else:
            out = self._update_loss(ctx.model, x, x_adv, y)
            ctx.backward(out["loss"])
        ctx.step()
        ctx.counter.add(n, 2)
        return {k: v.detach() for k, v in out.items()}

    def _update_loss(self, model, x, x_adv, y) -> dict:
        c, a = self.cfg, self.cfg.taylor_weight
        (logits, feats), (logits_adv, feats_adv) = self.trades.forward_pair(model, x, x_adv, features=True)
        natural, robust = trades_terms(logits, logits_adv, y)
        with torch.no_grad():  # the soft labels are targets: no gradient flows through them (the code's .grad)
            g_nat, g_adv = last_layer_row_sums(logits, feats, y), last_layer_row_sums(logits_adv, feats_adv, y)
            t1 = smoothing_targets(g_nat.abs() - g_adv.abs(), self.c)
            t1_ = smoothing_targets(g_adv.abs() - g_nat.abs(), self.c)
            t2_ = smoothing_targets(g_adv.square() - g_nat.square(), self.c)
            t2 = t2_ if c.second_order_targets == "as_coded" else smoothing_targets(g_nat.square() - g_adv.square(),
                                                                                   self.c)
        log_p, log_p_adv = F.log_softmax(logits.float(), 1), F.log_softmax(logits_adv.float(), 1)

        def kl(targets: Tensor, log_probs: Tensor) -> Tensor:
            return F.kl_div(log_probs, targets[y], reduction="batchmean")

        first = 0.5 * (kl(t1, log_p_adv) + kl(t1_, log_p))
        second = kl(t2, log_p_adv) + kl(t2_, log_p)
        loss = (1 - a) * natural + c.beta * robust + a * first + a * c.second_order * second
        return {"loss": loss, "acc": accuracy(logits, y), "robust_kl": robust, "taylor": first + c.second_order * second}


def _noisy_copy(model: nn.Module, std: float) -> nn.Module:
    """The attacking copy of the paper's story: Gaussian noise of absolute std on every convolution's weight."""
    noisy = copy.deepcopy(model)
    with torch.no_grad():
        for m in noisy.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.add_(torch.randn_like(m.weight) * std)
    return noisy
