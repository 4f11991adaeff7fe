"""Adapter around the official AutoAttack (pyautoattack, Croce & Hein 2020).

    robust = AutoAttackEval(eps=8/255)(model, x, y)      # bool (N,): still correct under APGD-CE/T, FAB-T, Square
    robust = AutoAttackEval(eps=8/255, version='custom', attacks=['apgd-ce'])(model, x, y)

The 'standard' version targets the 9 most likely other classes (APGD-T, FAB-T); a model with fewer classes is
attacked towards all of its other classes instead (the same rule, capped at what exists).

After each call, `robust_after` holds how many of the examples were still robust after each of AutoAttack's attacks
in turn (APGD-CE, then APGD-T, ...: a big fall at Square, a black-box attack, after the gradient attacks is the
mark of gradient masking), and `warnings` the reliability warnings AutoAttack's own checks raised (randomness,
output range, Square succeeding where gradients failed, ...). Its progress chatter is dropped unless the run asked
for DEBUG logging; its warnings never are.
"""
import logging
import re
from contextlib import contextmanager
from unittest import mock

import torch
from torch import Tensor, nn

from .geometry import check_norm
from .modes import bn_mode

AA_NORMS = {'linf': 'Linf', 'l2': 'L2'}
VERSIONS = ('standard', 'plus', 'rand', 'custom')
ATTACKS = ('apgd-ce', 'apgd-dlr', 'fab', 'square', 'apgd-t', 'fab-t')
# pyautoattack's _set_version: the attacks each version runs, in order.
VERSION_ATTACKS = {'standard': ('apgd-ce', 'apgd-t', 'fab-t', 'square'),
                   'plus': ('apgd-ce', 'apgd-dlr', 'fab', 'square', 'apgd-t', 'fab-t'),
                   'rand': ('apgd-ce', 'apgd-dlr')}
BALL_TOL = 1e-5  # pixel units; float rounding in AutoAttack's own projections stays far below this


# The official code's record of an attack done: "robust accuracy after APGD-T: 48.00% (total time 61.3 s)".
STAGE_DONE = re.compile(r"robust accuracy after (\S+): ([\d.]+)% \(total time ([\d.]+) s\)")


@contextmanager
def _warnings_only(logger: logging.Logger, on_stage=None):
    """Collect AutoAttack's WARNING records (its reliability checks) and show nothing else, unless the run asked for
    DEBUG, which keeps everything as it was. `on_stage(attack, robust %, seconds)` hears each of its attacks finish
    (a DEBUG record of the official code's)."""
    caught: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:
                caught.append(record.getMessage())
            elif on_stage is not None and (done := STAGE_DONE.match(record.getMessage())):
                on_stage(done.group(1).lower(), float(done.group(2)), float(done.group(3)))

    handler = Keep(level=logging.DEBUG if on_stage is not None else logging.WARNING)
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    if not logger.isEnabledFor(logging.DEBUG):
        logger.setLevel(logging.DEBUG if on_stage is not None else logging.WARNING)
        logger.propagate = False  # the caller reports them, once each, in its own words
    try:
        yield caught
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


@contextmanager
def _robust_accuracy_after_each_attack():
    """The official code keeps the robust accuracy after each attack in a local dict that it hands to its Square
    check only: read it there, leaving the check to run as it does."""
    import pyautoattack.autoattack as official

    seen: dict[str, float] = {}
    check = official.checks.check_square_sr

    def reading(acc_dict, *args, **kwargs):
        seen.update(acc_dict)
        return check(acc_dict, *args, **kwargs)

    with mock.patch.object(official.checks, 'check_square_sr', reading):
        yield seen


class AutoAttackEval:
    def __init__(self, *, eps: float, norm: str = 'linf', version: str = 'standard', seed: int = 0,
                 batch_size: int = 500, attacks: list[str] | None = None):
        check_norm(norm)
        if version not in VERSIONS:
            raise ValueError(f"unknown AutoAttack version {version!r}; valid versions: {', '.join(VERSIONS)}")
        if (version == 'custom') != (attacks is not None):
            raise ValueError("AutoAttack 'attacks' is required with version='custom' and not allowed otherwise")
        unknown = sorted(set(attacks or ()) - set(ATTACKS))
        if unknown:
            raise ValueError(f"unknown AutoAttack attacks {unknown}; valid attacks: {', '.join(ATTACKS)}")
        self.eps, self.norm, self.version, self.seed = float(eps), norm, version, seed
        self.batch_size, self.attacks = batch_size, list(attacks) if attacks is not None else None
        self.robust_after: dict[str, int] = {}
        self.warnings: list[str] = []
        self.on_stage = None  # (attack, robust % of the batch, seconds) as each of AutoAttack's attacks finishes

    @property
    def attack_names(self) -> list[str]:
        """The attacks this evaluation runs, in AutoAttack's order."""
        return list(self.attacks) if self.version == 'custom' else list(VERSION_ATTACKS[self.version])

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """Bool tensor (N,): True where the example is still classified correctly after every attack."""
        # AutoAttack reseeds the global generators; forking keeps the caller's random stream untouched.
        from pyautoattack import AutoAttack  # optional: the core trains and runs PGD without it

        devices = [x.device] if x.device.type == 'cuda' else []
        # Evaluation is fp32 whatever the training precision: the numbers describe the deployed model.
        with bn_mode(model, 'eval'), _warnings_only(logging.getLogger('auto-attack'), self.on_stage) as warned, \
                _robust_accuracy_after_each_attack() as after, torch.random.fork_rng(devices), \
                torch.autocast(x.device.type, enabled=False):
            adversary = AutoAttack(model, norm=AA_NORMS[self.norm], eps=self.eps, version=self.version,
                                   device=x.device, seed=self.seed, attacks=self.attacks)
            with torch.no_grad():
                other_classes = model(x[:1]).shape[1] - 1
            for targeted in (adversary.apgd_targeted, adversary.fab):
                targeted.n_target_classes = min(targeted.n_target_classes, other_classes)
            x_adv, y_adv = adversary.run_standard_evaluation(x, y, batch_size=self.batch_size)
        self.warnings = list(dict.fromkeys(warned))
        # An attack that did not run found no robust example left: the count stays at the last one's (0).
        count = round(after.get('clean', 0.0) * len(y))
        self.robust_after = {}
        for name in self.attack_names:
            count = round(after[name] * len(y)) if name in after else count
            self.robust_after[name] = count
        delta = (x_adv - x).flatten(1)
        size = delta.abs().amax(dim=1) if self.norm == 'linf' else delta.norm(dim=1)
        if (size > self.eps + BALL_TOL).any():
            raise RuntimeError(f"AutoAttack returned points outside the {self.norm} ball: max perturbation "
                               f"{size.max().item():.6g} > eps {self.eps:.6g}")
        return y_adv == y
