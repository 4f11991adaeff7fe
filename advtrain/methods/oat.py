"""OAT, once-for-all adversarial training (Wang et al., NeurIPS 2020, arXiv 2010.11828; code github
VITA-Group/Once-for-All-Adversarial-Training): one model conditioned on lambda, the weight of the adversarial loss,
trained at every lambda of a set at once; at test time each lambda is one forward of the same model, a point on the
accuracy-robustness trade-off.

- wrap_model puts `advtrain.models.FiLMDualBN` in place of every BatchNorm2d (dual BN routed per example by lambda,
  FiLM from lambda's encoding); an architecture without BatchNorm is refused in one line (arch=bn_cnn is a small one).
- Per batch: a share `p_zero` (default 1/|P|, the authors' ceil(B/|P|)) of the examples gets lambda = 0, the rest a
  lambda drawn uniformly from the others, at random positions (routing is per example, never by position).
- PGD (the authors': 7 steps, step (10/255)/7 at eps 8/255, random start) runs only on the lambda > 0 examples, on the
  model conditioned on their lambdas, BN in eval mode.
- Loss: the mean over the batch of (1 - lambda) CE(f(x; lambda), y) + lambda CE(f(x'; lambda), y), one forward of the
  clean batch and the adversarial rows together (the authors run two; one is what DDP allows, and the routing keeps
  each example's BN by its own lambda either way).
- Evaluation: one view per lambda ("lambda=0.3"), every attack of the suite on the model bound to it.

Cost: one pass for every example (its clean half of the update), plus for the lambda > 0 examples the attack's steps
and their adversarial half: 1 + (1 - p_zero)(steps + 1) passes per example.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, List, Optional

import torch
from torch import nn
from torch.nn import functional as F

from advtrain.attacks import pgd
from advtrain.errors import ConfigError
from advtrain.methods.base import Method, View, accuracy
from advtrain.models import bind, replace_modules
from advtrain.models.conditioned_bn import FiLMDualBN, FixedLambda, Lambdas, orthogonal_encoding
from advtrain.schema import SEED, SEED_MAX, MethodConfig, attack_steps, choice, count, in_range, pixel


class OAT(Method):
    find_unused_parameters = True  # a batch with no lambda = 0 example leaves BN_clean without a gradient

    @dataclass
    class Config(MethodConfig):
        eps: Any = pixel("${dataset.eps}")
        alpha: Any = pixel("${dataset.pgd_alpha}")  # the attack's step size
        steps: int = attack_steps(7)
        start: str = choice("uniform", "uniform_raw", "none")
        bn: str = choice("eval", "train", "keep")  # BN mode while attacking
        lambdas: List[float] = field(default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.4, 1.0])
        # share of each batch at lambda = 0 (null: 1 / len(lambdas))
        p_zero: Optional[float] = in_range(0, 1, None, what="a share of each batch")
        # the lambda encoding's size (rows of a seeded random orthogonal matrix)
        encoding_dim: int = count(128, what="the encoding's size")
        # the authors' encoding is unseeded; here it is, and inside the checkpoint
        encoding_seed: int = in_range(0, SEED_MAX, 0, what=SEED)
        # the lambdas evaluated at the end, each a view with the whole attack suite (null: every trained lambda).
        # AutoAttack per lambda is most of a small run's cost: a comparison can keep the two ends, [0.0, 1.0].
        eval_lambdas: Optional[List[float]] = None

    def __init__(self, cfg, info):
        super().__init__(cfg, info)
        lambdas = [float(v) for v in cfg.lambdas]
        if 0.0 not in lambdas or len(set(lambdas)) != len(lambdas) or not all(0 <= v <= 1 for v in lambdas):
            raise ConfigError(f"method.lambdas={lambdas}: expected distinct values in [0, 1], 0 among them")
        self.lambdas = tuple(sorted(lambdas))
        self.p_zero = cfg.p_zero if cfg.p_zero is not None else 1 / len(self.lambdas)
        self.others = [v for v in self.lambdas if v > 0]
        self.eval_lambdas = _subset("eval_lambdas", cfg.eval_lambdas, self.lambdas, "method.lambdas")
        self.generator = torch.Generator().manual_seed(0)  # host-side lambda sampling, carried in checkpoints

    @classmethod
    def check_model(cls, model):
        if not any(isinstance(m, nn.BatchNorm2d) for m in model.body.modules()):
            raise ConfigError(f"method=oat conditions BatchNorm layers, and arch={getattr(model, 'arch', '?')} has "
                              "none: choose an architecture with BatchNorm (e.g. arch=bn_cnn, preact_resnet18, "
                              "resnet34, wrn16_8)")

    def wrap_model(self, model, companions):
        self.check_model(model)
        encoding = orthogonal_encoding(len(self.lambdas), self.cfg.encoding_dim, self.cfg.encoding_seed)
        replace_modules(model.body, lambda name, m: isinstance(m, nn.BatchNorm2d),
                        lambda name, m: FiLMDualBN(m, self.lambdas, encoding))
        return model

    def sample(self, n: int) -> torch.Tensor:
        """n lambdas on the host: ceil(p_zero n) zeros, the rest uniform over the others, at random positions."""
        zeros = min(n, math.ceil(self.p_zero * n))
        picks = torch.randint(len(self.others), (n - zeros,), generator=self.generator)
        values = torch.cat([torch.zeros(zeros), torch.tensor(self.others)[picks]])
        return values[torch.randperm(n, generator=self.generator)]

    def train_step(self, batch, ctx):
        loss, clean = self.loss(ctx, batch.x, batch.y, self.sample(len(batch.y)))
        ctx.update(loss)
        return {"loss": loss.detach(), "acc": accuracy(clean, batch.y)}

    def loss(self, ctx, x, y, values, condition=lambda lam: lam, counter=None):
        """(the batch's OAT loss at the given lambdas, the clean logits), its passes counted on `counter` (default
        ctx.counter). `condition` turns the Lambdas of a forward into the model's condition (OATS adds a width)."""
        c, t, counter = self.cfg, self.threat, ctx.counter if counter is None else counter
        lam = Lambdas.of(values, self.lambdas, x.device)
        adv_rows = lam.other
        weights = values.to(x.device)
        if adv_rows is None:  # every example at lambda = 0: a clean step
            logits = ctx.model(x, cond=condition(lam))
            counter.add(len(y), 1)
            return F.cross_entropy(logits.float(), y), logits
        x_rows, y_rows = x.index_select(0, adv_rows), y.index_select(0, adv_rows)
        adv_lam = Lambdas.of(values[values > 0], self.lambdas, x.device)
        x_adv = pgd(bind(ctx.attack_model, condition(adv_lam)), x_rows, y_rows, eps=t.eps, alpha=t.alpha,
                    steps=c.steps, start=c.start, bn=c.bn, counter=counter)
        joint = Lambdas.of(torch.cat([values, values[values > 0]]), self.lambdas, x.device)
        logits = ctx.model(torch.cat([x, x_adv]), cond=condition(joint)).float()
        clean, adv = logits[: len(y)], logits[len(y):]
        ce_clean = F.cross_entropy(clean, y, reduction="none")
        ce_adv = torch.zeros_like(ce_clean).index_copy(0, adv_rows, F.cross_entropy(adv, y_rows, reduction="none"))
        counter.add(len(y), 1)
        counter.add(len(y_rows), 1)
        return ((1 - weights) * ce_clean + weights * ce_adv).mean(), clean

    def views(self):
        return [View(f"lambda={v:g}", FixedLambda(v, self.lambdas)) for v in self.lambdas]

    def eval_views(self):
        return [View(f"lambda={v:g}", FixedLambda(v, self.lambdas)) for v in self.eval_lambdas]

    def select_score(self, scores):
        """Model selection: the first attack's accuracy averaged over the lambdas (one checkpoint serves them all)."""
        def robust(s):
            return s[next((k for k in s if k not in ("n", "clean")), "clean")]

        return sum(robust(s) for s in scores.values()) / len(scores)

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])


def _subset(key: str, chosen, trained: tuple, trained_key: str) -> tuple:
    """The values of `chosen` (null: all of `trained`), each one of `trained`: a view is a trained setting."""
    if chosen is None:
        return trained
    values = [float(v) for v in chosen]
    stray = [v for v in values if v not in trained]
    if stray or not values:
        raise ConfigError(f"method.{key}={values}: expected a non-empty list of values of {trained_key}="
                          f"{list(trained)}")
    return tuple(sorted(set(values)))
