"""OATS, once-for-all adversarial training and slimming (Wang et al., NeurIPS 2020, arXiv 2010.11828): OAT's lambda
conditioning plus width slimming, so one model serves every (width, lambda) pair, accuracy-robustness against cost.

    advtrain experiment=fashion_mnist_oats dataset.root=/path/to/data     # a laptop CPU
    advtrain experiment=cifar10_oats_resnet34                             # the authors' CIFAR-10 model

- wrap_model makes the network slimmable (`advtrain.models.slimmable`): convs and linears use their first
  ceil(w C) output channels at width w, every BatchNorm2d becomes one OAT block (dual BN + FiLM) per width; the
  architectures of SLIMMABLE_ARCHS only, the others refused in one line.
- Per batch: OAT's lambdas are drawn once; then for every width, OAT's loss at that width (PGD on the lambda > 0
  examples against the model at that width and their lambdas, then (1 - lambda) CE(clean) + lambda CE(adv)), its
  backward scaled by 1 / |widths| (the loss averaged over widths), and ONE optimizer step for the batch. The authors
  released the models but no OATS training script: this loop is inferred from their figure (the loss averaged over
  widths, x_adv made by each width's own subnetwork) and the slimmable-networks recipe (every width per batch,
  gradients summed, one step). Under DDP every backward but the last skips the all-reduce (ctx.backward).
- Evaluation: one view per (width, lambda), "width=0.5,lambda=0.3", full width first; results.json's "flops" gives
  each view's forward multiply-adds (advtrain.models.forward_flops, on one input of the dataset's shape).

Cost: a pass at width w counts FLOPs(w) / FLOPs(1) of a full pass, so with r_w that share and p the share of a
batch at lambda = 0, one batch costs sum_w r_w (1 + (1 - p)(steps + 1)) passes per example (OAT's cost per width).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import List, Optional

import torch

from advtrain.errors import ConfigError
from advtrain.methods.base import View, accuracy
from advtrain.methods.oat import OAT, _subset
from advtrain.models import forward_flops
from advtrain.models.conditioned_bn import FixedLambda, orthogonal_encoding
from advtrain.models.slimmable import SLIMMABLE_ARCHS, FixedSlim, Slim, slim


class OATS(OAT):
    compilable = False  # every forward changes the layers' shapes with the width: not tried under torch.compile

    @dataclass
    class Config(OAT.Config):
        widths: List[float] = field(default_factory=lambda: [0.5, 0.75, 1.0])  # width multipliers, 1.0 among them
        eval_widths: Optional[List[float]] = None  # the widths evaluated at the end (null: every trained width)

    def __init__(self, cfg, info):
        super().__init__(cfg, info)
        widths = [float(w) for w in cfg.widths]
        if 1.0 not in widths or len(set(widths)) != len(widths) or not all(0 < w <= 1 for w in widths):
            raise ConfigError(f"method.widths={widths}: expected distinct values in (0, 1], 1.0 among them")
        self.widths = tuple(sorted(widths))
        self.eval_widths = _subset("eval_widths", cfg.eval_widths, self.widths, "method.widths")
        self.width_flops: dict[float, int] = {}  # width -> multiply-adds of one forward (set by wrap_model)

    @classmethod
    def check_model(cls, model):
        arch = getattr(model, "arch", "?")
        if arch not in SLIMMABLE_ARCHS:
            raise ConfigError(f"method=oats slims convolutions and conditions BatchNorm, and arch={arch} cannot be "
                              f"slimmed: choose one of {', '.join(SLIMMABLE_ARCHS)}")

    def wrap_model(self, model, companions):
        self.check_model(model)
        slim(model, self.widths, self.lambdas, orthogonal_encoding(len(self.lambdas), self.cfg.encoding_dim,
                                                                   self.cfg.encoding_seed))
        shape = tuple(self.info.shape)
        self.width_flops = {w: forward_flops(model, shape, FixedSlim(w, FixedLambda(0.0, self.lambdas)))
                            for w in self.widths}
        return model

    def train_step(self, batch, ctx):
        x, y = batch.x, batch.y
        values = self.sample(len(y))
        losses, accs = [], []
        for i, width in enumerate(self.widths):
            share = self.width_flops[width] / self.width_flops[1.0]
            loss, clean = self.loss(ctx, x, y, values, condition=partial(Slim, width),
                                    counter=_Scaled(ctx.counter, share))
            ctx.backward(loss / len(self.widths), last=i == len(self.widths) - 1)
            losses.append(loss.detach())
            accs.append(accuracy(clean, y))
        ctx.step()
        return {"loss": torch.stack(losses).mean(), "acc": torch.stack(accs).mean()}

    def views(self):
        return self._views(self.widths, self.lambdas)

    def eval_views(self):
        return self._views(self.eval_widths, self.eval_lambdas)

    def _views(self, widths, lambdas):
        return [View(f"width={w:g},lambda={v:g}", FixedSlim(w, FixedLambda(v, self.lambdas)), self.width_flops[w])
                for w in reversed(widths) for v in lambdas]


class _Scaled:
    """A pass counter seen through a width: each pass counts `share` of a full-width one."""

    def __init__(self, counter, share: float):
        self.counter, self.share = counter, share

    def add(self, n_examples: int, passes: float = 1.0) -> None:
        self.counter.add(n_examples, passes * self.share)
