"""Adapter around the official AutoAttack (pyautoattack, Croce & Hein 2020).

    robust = AutoAttackEval(eps=8/255)(model, x, y)      # bool (N,): still correct under APGD-CE/T, FAB-T, Square
    robust = AutoAttackEval(eps=8/255, version='custom', attacks=['apgd-ce'])(model, x, y)

The 'standard' version targets the 9 most likely other classes (APGD-T, FAB-T); a model with fewer classes is
attacked towards all of its other classes instead (the same rule, capped at what exists).
"""
import logging
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .geometry import check_norm
from .modes import bn_mode

AA_NORMS = {'linf': 'Linf', 'l2': 'L2'}
VERSIONS = ('standard', 'plus', 'rand', 'custom')
ATTACKS = ('apgd-ce', 'apgd-dlr', 'fab', 'square', 'apgd-t', 'fab-t')
BALL_TOL = 1e-5  # pixel units; float rounding in AutoAttack's own projections stays far below this


@contextmanager
def _quiet(logger: logging.Logger):
    """AutoAttack logs progress and its sanity checks per batch; keep them only when the run asked for DEBUG."""
    if logger.isEnabledFor(logging.DEBUG):
        yield
        return
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


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

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """Bool tensor (N,): True where the example is still classified correctly after every attack."""
        # AutoAttack reseeds the global generators; forking keeps the caller's random stream untouched.
        from pyautoattack import AutoAttack  # optional: the core trains and runs PGD without it

        devices = [x.device] if x.device.type == 'cuda' else []
        with bn_mode(model, 'eval'), _quiet(logging.getLogger('auto-attack')), torch.random.fork_rng(devices):
            adversary = AutoAttack(model, norm=AA_NORMS[self.norm], eps=self.eps, version=self.version,
                                   device=x.device, seed=self.seed, attacks=self.attacks)
            with torch.no_grad():
                other_classes = model(x[:1]).shape[1] - 1
            for targeted in (adversary.apgd_targeted, adversary.fab):
                targeted.n_target_classes = min(targeted.n_target_classes, other_classes)
            x_adv, y_adv = adversary.run_standard_evaluation(x, y, batch_size=self.batch_size)
        delta = (x_adv - x).flatten(1)
        size = delta.abs().amax(dim=1) if self.norm == 'linf' else delta.norm(dim=1)
        if (size > self.eps + BALL_TOL).any():
            raise RuntimeError(f"AutoAttack returned points outside the {self.norm} ball: max perturbation "
                               f"{size.max().item():.6g} > eps {self.eps:.6g}")
        return y_adv == y
