"""Evaluation-suite entries -> callables (model, x, y) -> bool (N,) "still correct under this attack".

    build_attack('pgd20', {'type': 'pgd', 'eps': 8/255, 'alpha': 2/255, 'steps': 20, 'restarts': 1})
    build_attack('aa', {'type': 'autoattack', 'eps': 8/255, 'version': 'standard'})

Evaluation always runs in eval mode and in float32 (an enclosing autocast is switched off), so the reported
robustness is that of the deployed model, not of a low-precision or train-mode variant of it.
"""
from functools import partial
from typing import Callable, Mapping

import torch
from torch import Tensor, nn

from .autoattack import AutoAttackEval
from .projected import fgsm, pgd
from .modes import bn_mode

# type -> (required keys, optional keys) besides 'type'
_KEYS = {
    'pgd': ({'eps', 'alpha', 'steps'}, {'restarts', 'norm', 'loss', 'start'}),
    'cw': ({'eps', 'alpha', 'steps'}, {'restarts', 'norm', 'start'}),
    'fgsm': ({'eps'}, {'norm'}),
    'autoattack': ({'eps'}, {'norm', 'version', 'seed', 'attacks', 'batch_size'}),
}


def _still_correct(attack: Callable[..., Tensor], model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    with bn_mode(model, 'eval'), torch.autocast(x.device.type, enabled=False):
        x_adv = attack(model, x, y)
        with torch.no_grad():
            return model(x_adv).argmax(dim=1) == y


def build_attack(name: str, spec: Mapping) -> Callable[[nn.Module, Tensor, Tensor], Tensor]:
    kind = spec.get('type')
    if kind not in _KEYS:
        raise ValueError(f"attack {name!r}: unknown type {kind!r}; valid types: {', '.join(_KEYS)}")
    required, optional = _KEYS[kind]
    keys = set(spec) - {'type'}
    unknown, missing = sorted(keys - required - optional), sorted(required - keys)
    if unknown:
        raise ValueError(f"attack {name!r} ({kind}): unknown keys {unknown}; valid keys: "
                         f"{', '.join(sorted(required | optional))}")
    if missing:
        raise ValueError(f"attack {name!r} ({kind}): missing keys {missing}")
    kw = {k: spec[k] for k in keys}
    if kind == 'autoattack':  # the adapter itself: evaluate() reads its per-attack breakdown and warnings
        return AutoAttackEval(**kw)
    if kind == 'fgsm':
        return partial(_still_correct, partial(fgsm, **kw))
    if kind == 'cw':
        kw['loss'] = 'cw'
    # Restarts after the first attack only the examples still standing: the same answer at a fraction of the cost.
    return partial(_still_correct, partial(pgd, skip_fooled=True, **kw))
