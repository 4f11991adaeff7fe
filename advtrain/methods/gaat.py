"""GAAT, adversarial training with gradient approximation: advtrain's RECONSTRUCTION of Gong 2023 (arXiv 2309.09464),
whose code and body are not published; only its abstract is (../shared/specs/gaat.md, docs/methods/gaat.md).

Per batch, a K-step L-inf PGD in which only `n_exact` steps compute the input gradient; the others step along the
gradient of the adversarial loss's Taylor partial sum of `order` 1 or 2 around the latest exact gradients
(advtrain.attacks.taylor), which costs no pass. `carry` starts each example's attack from its own perturbation of
the previous visit (stored per example in the original image frame, moved through the batch's crop and flip)
instead of a random point. Then one update on CE(f(x + delta_K)).
Cost: n_exact + 1 passes per example (an approximated step is a few element-wise operations).

    advtrain method=gaat dataset=mnist                                   # K = 40 steps, 4 of them exact
    advtrain method=gaat method.approx=false method.carry=false          # = PGD-AT, n_exact steps (ablation)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from advtrain.attacks import pgd, random_init
from advtrain.errors import ConfigError
from advtrain.methods.base import cross_entropy_update
from advtrain.methods.steps_schedule import StepsMethod
from advtrain.schema import MethodConfig, attack_steps, choice, count, pixel


class GAAT(StepsMethod):

    @dataclass
    class Config(MethodConfig):
        eps: Any = pixel("${dataset.eps}")
        alpha: Any = pixel("${dataset.pgd_alpha}")  # step size, pixel units
        steps: int = attack_steps("${dataset.pgd_steps}")  # K: the PGD-K attack this one stands in for
        n_exact: int = 4              # steps per attack whose input gradient is computed (each one pass)
        exact_at: str = choice("spread", "first")  # spread: steps 0, K/n, 2K/n, ...; first: 0 .. n_exact-1
        order: int = 2                # Taylor partial sum: 1 (gradient held) | 2 (secant curvature term)
        approx: bool = True           # false: no approximated steps; n_exact exact steps of alpha * K / n_exact
        carry: bool = True            # warm start from each example's previous perturbation
        # carry: epochs between resets to a random start (0: never)
        reset_every: int = count(0, low=0, what="a number of epochs")
        start: str = choice("uniform", "uniform_raw", "none")  # the random start (first visit, carry=false)
        bn: str = choice("eval", "train", "keep")  # BN mode while attacking

    def __init__(self, cfg, info):
        super().__init__(cfg, info)
        if not 1 <= cfg.n_exact <= max(cfg.steps, 1):
            raise ConfigError(f"method.n_exact={cfg.n_exact} must be in 1..method.steps={cfg.steps}")
        if cfg.order not in (1, 2):
            raise ConfigError(f"method.order={cfg.order} is not valid; choose one of: 1, 2")
        if cfg.carry and info.name == "imagefolder":
            raise ConfigError("method.carry=true needs the device-resident loader (its crops and flips are known per "
                              "example); dataset=imagefolder augments on CPU workers: use method.carry=false")
        self.delta: torch.Tensor | None = None  # (n_train, C, H, W) float16, original image frame
        self.seen: torch.Tensor | None = None   # (n_train,) bool: has this example a stored perturbation?

    def setup(self, ctx):
        if self.cfg.carry and ctx.dist.enabled:
            raise ConfigError("method.carry=true keeps one perturbation per example on one process; with "
                              "trainer.devices > 1 use method.carry=false")

    def exact_steps(self, steps: int) -> list[int]:
        n = min(self.cfg.n_exact, steps)
        if self.cfg.exact_at == "first":
            return list(range(n))
        return sorted({i * steps // n for i in range(n)})

    def train_step(self, batch, ctx):
        c, t = self.cfg, self.threat
        steps = self.steps if c.approx else min(c.n_exact, self.steps)
        # Without the approximated steps the exact ones take the whole path: K steps of alpha in n_exact strides.
        alpha = t.alpha if c.approx else t.alpha * self.steps / max(steps, 1)
        init = self._carried(batch) if c.carry else None
        x_adv = pgd(ctx.attack_model, batch.x, batch.y, eps=t.eps, alpha=alpha, steps=steps, start=c.start,
                    bn=c.bn, counter=ctx.counter, exact_steps=self.exact_steps(steps) if c.approx else None,
                    order=c.order, init=init)
        if c.carry:
            self._store(batch, x_adv - batch.x)
        return cross_entropy_update(ctx, x_adv, batch.y)

    def epoch_start(self, ctx):
        every = self.cfg.reset_every
        if self.seen is not None and every and ctx.epoch % every == 0:
            self.seen.zero_()

    def _carried(self, batch) -> torch.Tensor:
        """The attack's start x + delta: the example's stored delta moved into this batch's crop and flip, or a
        random start where it has none."""
        x = batch.x
        if self.delta is None:
            self.delta = torch.zeros((self.info.n_train, *x.shape[1:]), dtype=torch.float16, device=x.device)
            self.seen = torch.zeros(self.info.n_train, dtype=torch.bool, device=x.device)
        self.delta, self.seen = self.delta.to(x.device), self.seen.to(x.device)  # checkpoints load onto the CPU
        # Imported here: advtrain.data brings torchvision and torch._dynamo, seconds that a config check of
        # method=gaat (which imports this module) would spend before it could refuse a typo.
        from advtrain.data.augment import apply_augmentation

        stored = apply_augmentation(self.delta[batch.index].float(), batch.crop, batch.flip, self.info.crop_padding)
        fresh = random_init(x, self.threat.eps, "linf", self.cfg.start)
        return torch.where(self.seen[batch.index].view(-1, 1, 1, 1), x + stored, fresh)

    def _store(self, batch, delta: torch.Tensor) -> None:
        from advtrain.data.augment import invert_augmentation

        uncovered = self.delta[batch.index].float() if batch.crop is not None else None  # kept outside the crop
        self.delta[batch.index] = invert_augmentation(delta, batch.crop, batch.flip, self.info.crop_padding,
                                                      into=uncovered).to(self.delta.dtype)
        self.seen[batch.index] = True

    def state_dict(self):
        return {**super().state_dict(), "delta": self.delta, "seen": self.seen}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.delta, self.seen = state["delta"], state["seen"]
