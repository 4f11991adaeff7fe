"""The K-step PGD attack of PGD-AT, TRADES (and MART, AWP over either, RAT) and GAAT, with K as the method's state:
under steps_schedule=magnitude, DEAT's rule grows K between epochs (advtrain.methods.schedules holds the rule)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from advtrain.attacks import PassCounter, pgd
from advtrain.methods.base import Method
from advtrain.methods.schedules import GradMagnitude, MagnitudeRule

if TYPE_CHECKING:
    from advtrain.data import DatasetInfo
    from advtrain.methods.context import MethodContext


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
            # The configured alpha and eps: the rule compares alpha K with eps, a ratio the ε warm-up leaves alone.
            self.schedule = MagnitudeRule(start=0, most=cfg.steps, gamma=cfg.gamma, alpha=cfg.alpha, eps=cfg.eps)
            self.steps = self.schedule.count
            self.grad_mag = GradMagnitude()

    def attack(self, model: nn.Module, counter: PassCounter, x: Tensor, y: Tensor | None, **kwargs) -> Tensor:
        """The method's PGD with the current K on `model` (the plain attacking module, or a copy of it), its passes
        counted on `counter`; under a schedule, its last step's gradient also feeds G."""
        t = self.threat
        last_grad = None if self.schedule is None else self.grad_mag.add
        return pgd(model, x, y, eps=t.eps, alpha=t.alpha, steps=self.steps, bn=self.cfg.bn, counter=counter,
                   last_grad=last_grad, **kwargs)

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
