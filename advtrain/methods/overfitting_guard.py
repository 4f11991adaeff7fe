"""The catastrophic-overfitting guard of single-step methods (Wong et al.'s FGSM-RS code, `--early-stop`), for
fgsm_rs, nfgsm, gradalign and free alike.

Catastrophic overfitting is a single-step method's robustness collapsing within an epoch while its training loss
looks fine. After each epoch the guard attacks a fixed training minibatch with PGD; when its accuracy falls by more
than `guard_drop` below the previous epoch's, `guard_action=stop` ends training and restores the weights of the last
good epoch (FGSM-RS's code), `warn` says so in one line and trains on. The guard's PGD uses alpha = 2.5 eps /
guard_steps so it reaches the edge of the ball on any dataset (FGSM-RS's CIFAR setting, 5 steps of 2/255 at eps
8/255, is as strong). It always attacks at the full eps, also during trainer.eps_warmup: epoch to epoch it must
compare one threat model, or the growing eps of the warm-up reads as a collapse. Its passes are not counted (like
evaluation, it watches training); its time is in train_time_s.
"""
from dataclasses import dataclass

import torch

from advtrain.attacks import bn_mode, pgd
from advtrain.methods.base import Method, copy_weights
from advtrain.schema import MethodConfig, attack_steps, choice, count, in_range


@dataclass
class GuardConfig(MethodConfig):
    """The guard's settings, shared by the methods that offer it (each sets its own default for `guard`)."""
    guard: bool = False
    guard_action: str = choice("stop", "warn")  # stop: restore the last good epoch and end training; warn: a line
    guard_n: int = count(512, what="a number of examples")  # examples in the fixed training minibatch
    guard_steps: int = attack_steps(5)
    guard_drop: float = in_range(0, 1, 0.2, what="a drop in accuracy (fraction)")  # of the guard's PGD accuracy


class GuardedMethod(Method):
    """A method whose Config derives from GuardConfig: the guard runs at each epoch's end. A subclass with state of
    its own extends state_dict / load_state_dict through super()."""

    def __init__(self, cfg, info):
        super().__init__(cfg, info)
        self.prev_robust_acc = 0.0
        self.good_weights: dict | None = None

    def epoch_end(self, ctx, metrics):
        c = self.cfg  # the configured eps, not self.threat's (see above)
        if not c.guard:
            return {}
        model = ctx.attack_model
        x, y = ctx.fixed_batch(c.guard_n)
        x_adv = pgd(model, x, y, eps=c.eps, alpha=2.5 * c.eps / c.guard_steps, steps=c.guard_steps,
                    start="uniform", bn="eval")
        with torch.no_grad(), bn_mode(model, "eval"), ctx.autocast():
            robust_acc = (model(x_adv).argmax(1) == y).float().mean().item()
        robust_acc = ctx.dist.mean(robust_acc)  # every rank restores (or not) alike, or the replicas would diverge
        fell = f"guard PGD accuracy fell from {100 * self.prev_robust_acc:.2f}% to {100 * robust_acc:.2f}%"
        collapsed = self.good_weights is not None and robust_acc - self.prev_robust_acc < -c.guard_drop
        if collapsed and c.guard_action == "stop":
            model.load_state_dict(self.good_weights)
            ctx.request_stop(f"catastrophic overfitting: {fell}; restored the weights of the previous epoch")
            return {"guard_pgd_acc": robust_acc}
        if collapsed:
            ctx.warn(f"catastrophic overfitting in epoch {ctx.epoch + 1}: {fell} (method.guard_action=warn: "
                     "training goes on)")
        self.prev_robust_acc = robust_acc
        # warn restores nothing: its empty dict only marks that an earlier epoch was measured
        self.good_weights = copy_weights(model) if c.guard_action == "stop" else {}
        return {"guard_pgd_acc": robust_acc}

    def state_dict(self):
        return {"prev_robust_acc": self.prev_robust_acc, "good_weights": self.good_weights}

    def load_state_dict(self, state):
        # .get: checkpoints of free written before it had the guard
        self.prev_robust_acc = float(state.get("prev_robust_acc", 0.0))
        self.good_weights = state.get("good_weights")
