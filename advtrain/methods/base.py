"""The training-method plug-in interface.

A method says how one minibatch becomes weight updates; the shared loop (advtrain.engine.loop) owns everything
else: data, precision, LR, timing, checkpoints, logging. The contract covers the shapes the methods take:

- most methods attack, then update once (PGD-AT, FGSM-RS, TRADES, GAAT): `train_step` calls `ctx.update` once;
- attacks read their settings in pixel units (eps, step sizes, start radii: the Config's pixel() fields) as
  `self.threat.eps`, ..., which follow trainer.eps_warmup (the loop sets `threat.scale` every minibatch); `self.cfg`
  holds the configured values. A method built inside another (AWP's base) joins its threat model (`share_threat`);
- replay methods update several times per minibatch, reusing the update's own backward for the attack (FREE, DEAT):
  `ctx.update(loss, inputs=(delta,))` returns the unscaled input gradients of that same pass;
- several forwards and backwards per optimizer step (OATS' widths): `ctx.backward(loss, last=False)` for all but
  the last (DDP skips their all-reduce), `ctx.backward(loss)`, then `ctx.step()`; a narrower pass counts as a
  fraction of one (`ctx.counter.add(n, passes=0.5)`);
- features from the update's own forward (RRM, RAT): `ctx.model(x, features=True)` gives (logits, features),
  through DDP and torch.compile;
- conditioned models (OAT's lambda): `wrap_model` puts `advtrain.models.Conditional` blocks in, `ctx.model(x,
  cond=c)` conditions a forward, and `advtrain.models.bind(model, c)` is the plain model attacks run on;
- schedule-driven methods change their attack between epochs (DEAT's magnitude rule): `epoch_end` returns the
  values to log and may change the method's state, which `state_dict` carries into checkpoints;
- frozen companion models (RRM's teacher): `companions()` names advtrain checkpoints; the engine loads them safely,
  on the device, in eval mode without gradients, outside DDP, the optimizer and checkpoints, as `ctx.companions`;
- architectures a method cannot change (OAT's BatchNorm, OATS' slimmable archs): `check_model` refuses them when
  the config is checked, before any data is read;
- requirements the engine honours: `find_unused_parameters` (some steps leave parameters unused: DDP must know),
  `compilable` (False: trainer.compile=true is refused in one line rather than giving wrong gradients);
- several evaluation settings of one model (OAT's lambda): `eval_views()` lists them as data, `select_score` says
  which number model selection keeps the best of.
"""
from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Mapping

import torch
from torch import Tensor, nn

from advtrain.methods.threat import ThreatModel
from advtrain.schema import MethodConfig

if TYPE_CHECKING:
    from advtrain.data import DatasetInfo
    from advtrain.data import Batch
    from advtrain.methods.context import MethodContext


@dataclass(frozen=True)
class View:
    """One setting a trained model is evaluated in: a name (metric names and results.json's "views" use it) and the
    condition that gives it (None: the plain model); `flops`, its forward's multiply-adds, where views differ in cost
    (OATS' widths: results.json keeps them beside the accuracies)."""
    name: str
    cond: Any = None
    flops: int | None = None


class Method:
    """Base class: natural training. Subclasses override `train_step` and whichever hooks they need, and declare
    their settings in a nested `Config(MethodConfig)` dataclass, from which their YAML is written."""

    Config = MethodConfig
    find_unused_parameters: bool = False  # some training steps leave parameters without a gradient (DDP must know)
    compilable: bool = True               # False: the method cannot run under torch.compile (refused in one line)

    def __init__(self, cfg: Any, info: DatasetInfo):
        self.cfg = cfg  # the configured settings; pixel ones are read through self.threat, at the warm-up's scale
        self.info = info
        self.threat = ThreatModel(cfg, self.Config)

    def share_threat(self, inner: Method) -> Method:
        """`inner`, a method built inside this one from its settings (AWP's base, RAT's TRADES), attacking in this
        one's threat model: the two hold one ThreatModel, so the ε warm-up's scale the loop sets here is inner's."""
        mine, theirs = self.threat.configured(), inner.threat.configured()
        differ = sorted(k for k, v in theirs.items() if k not in mine or mine[k] != v)
        if differ:
            raise ValueError(f"{type(inner).__name__}'s pixel settings {differ} are not {type(self).__name__}'s: an "
                             "inner method attacks in its outer method's threat model")
        inner.threat = self.threat
        return inner

    def wrap_model(self, model: nn.Module, companions: Mapping[str, nn.Module]) -> nn.Module:
        """Change the model once, when it is built (before the optimizer and checkpoint loading). `companions`: the
        frozen models of `companions()`, to read shapes from (when a checkpoint is rebuilt they are their
        architectures only: never read their weights here)."""
        return model

    @classmethod
    def check_model(cls, model: nn.Module) -> None:
        """Raise ConfigError, naming the arch and what is valid, for a model wrap_model cannot change. The config
        check calls it with the chosen arch freshly built for nominal 3x32x32 images (only where a method overrides
        this), so such a run is refused before any data is read."""

    def companions(self) -> dict[str, str]:
        """Frozen models this method needs: name -> path of an advtrain checkpoint (given as ctx.companions[name])."""
        return {}

    def setup(self, ctx: MethodContext) -> None:
        """Called once before training, after the model is on its device and any checkpoint is loaded."""

    def train_step(self, batch: Batch, ctx: MethodContext) -> dict[str, Tensor]:
        """Perform this minibatch's update(s); return detached scalar tensors to average over the epoch.

        Must include "loss"; "acc" (accuracy on the inputs the update trained on) is shown on the progress bar.
        Never call .item() here: the loop syncs with the device only at log intervals.
        """
        return cross_entropy_update(ctx, batch.x, batch.y)

    def epoch_start(self, ctx: MethodContext) -> None:
        """Called before each epoch's first batch."""

    def epoch_end(self, ctx: MethodContext, metrics: dict[str, float]) -> dict[str, float]:
        """Called after each epoch with its averaged metrics; returns extra per-epoch values to log."""
        return {}

    def eval_views(self) -> list[View]:
        """The settings the run evaluates; one unnamed view (the plain model) for most methods."""
        return [View("")]

    def views(self) -> list[View]:
        """Every setting a trained model can be used in (load_model's `view`): the evaluated ones, unless the
        method's config evaluates fewer than it trains (OAT's method.eval_lambdas)."""
        return self.eval_views()

    def select_score(self, scores: Mapping[str, Mapping[str, float]]) -> float:
        """The number model selection (best.pt) keeps the highest of, from a periodic evaluation's scores per view:
        by default the first view's first attack (its clean accuracy without attacks)."""
        first = next(iter(scores.values()))
        return first[next((k for k in first if k not in ("n", "clean")), "clean")]

    def state_dict(self) -> dict[str, Any]:
        """State carried in checkpoints: tensors, numbers, strings and containers of them only."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def config_of(method: type, **values) -> SimpleNamespace:
    """A settings object for `method` built inside another method (AWP's base, RAT's TRADES): `values`, and every
    other field at its Config's default, so a knob the inner method gains later is simply at its default."""
    defaults = {}
    for f in fields(method.Config):
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        if default is not MISSING:
            defaults[f.name] = default
    return SimpleNamespace(**{**defaults, **values})


def cross_entropy_update(ctx: MethodContext, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """One update on CE(f(x), y), counted as one pass per example: the last step of most methods."""
    logits = ctx.model(x)
    loss = nn.functional.cross_entropy(logits, y)
    ctx.update(loss)
    ctx.counter.add(len(y), 1)
    return {"loss": loss.detach(), "acc": accuracy(logits, y)}


def accuracy(logits: Tensor, y: Tensor) -> Tensor:
    return (logits.argmax(1) == y).float().mean().detach()


@torch.no_grad()
def copy_weights(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
