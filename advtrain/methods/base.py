"""The training-method plug-in interface.

A method says how one minibatch becomes weight updates; the shared loop (advtrain.engine.loop) owns everything
else: data, precision, LR, timing, checkpoints, logging. The contract covers the shapes the methods take:

- most methods attack, then update once (PGD-AT, FGSM-RS, TRADES, GAAT): `train_step` calls `ctx.update` once;
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

from advtrain.attacks import pgd
from advtrain.methods.schedules import GradMagnitude, MagnitudeRule
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
        self.cfg = cfg
        self.info = info
        self._full_cfg, self._threat_scale = cfg, 1.0

    @property
    def full_cfg(self) -> Any:
        """The configured settings, whatever the ε warm-up's current scale (self.cfg is the scaled view)."""
        return self._full_cfg

    @property
    def threat_scale(self) -> float:
        """The ε warm-up's current factor in [0, 1] (1 once it is over, or without one)."""
        return self._threat_scale

    def scale_threat_model(self, factor: float) -> None:
        """Scale every setting in pixel units (eps, step sizes, start radii: the Config fields marked pixel()) by
        `factor` in [0, 1], the ε warm-up of trainer.eps_warmup; 1 restores the configured values exactly."""
        if factor == self._threat_scale:
            return
        self._threat_scale = factor
        if factor == 1.0:
            self.cfg = self._full_cfg
            return
        full = self._full_cfg
        scaled = {f.name: getattr(full, f.name) for f in fields(self.Config) if hasattr(full, f.name)}
        for f in fields(self.Config):
            if f.metadata.get("pixel") and scaled.get(f.name) is not None:
                scaled[f.name] = scaled[f.name] * factor
        self.cfg = SimpleNamespace(**scaled)

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


class StepsMethod(Method):
    """A method with a K-step attack per batch. K is state, not config: a schedule may change it between epochs,
    checkpoints carry it, and every epoch logs it.

    steps_schedule=magnitude is DEAT's "M+" acceleration: K = 0 (clean training) in epoch 0, then 1, then one more
    after each epoch whose G (|input gradient| of the attacks' last steps, summed over the epoch) exceeds the
    threshold, or while alpha * K < eps; `steps` is the most K grows to (advtrain.methods.schedules).
    """

    def __init__(self, cfg: Any, info: DatasetInfo):
        super().__init__(cfg, info)
        self.steps = cfg.steps
        self.schedule: MagnitudeRule | None = None
        if getattr(cfg, "steps_schedule", "none") == "magnitude":  # older checkpoints' configs lack the key
            self.schedule = MagnitudeRule(start=0, most=cfg.steps, gamma=cfg.gamma, alpha=cfg.alpha, eps=cfg.eps)
            self.steps = self.schedule.count
            self.grad_mag = GradMagnitude()

    def attack(self, ctx: MethodContext, x: Tensor, y: Tensor | None, **kwargs) -> Tensor:
        """The method's PGD with the current K; under a schedule, its last step's gradient also feeds G."""
        c = self.cfg
        common = dict(eps=c.eps, alpha=c.alpha, steps=self.steps, bn=c.bn, counter=ctx.counter, **kwargs)
        last_grad = None if self.schedule is None else self.grad_mag.add
        return pgd(ctx.attack_model, x, y, last_grad=last_grad, **common)

    def epoch_end(self, ctx: MethodContext, metrics: dict[str, float]) -> dict[str, float]:
        used = {"attack_steps": float(self.steps)}
        if self.schedule is None:
            return used
        g, threshold = self.grad_mag.read(ctx.dist), self.schedule.threshold
        self.steps = self.schedule.after_epoch(ctx.epoch, g=g)
        return {**used, "G": g, **({} if threshold is None else {"threshold": threshold})}

    def state_dict(self) -> dict[str, Any]:
        if self.schedule is None:
            return {"steps": self.steps}
        return {"steps": self.steps, "schedule": self.schedule.state_dict(), "G": self.grad_mag.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        if self.schedule is not None:
            self.schedule.load_state_dict(state["schedule"])
            self.grad_mag.load_state_dict(state["G"])


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
