"""BN/dropout mode for the duration of an attack.

Restoring only the root's flag would be wrong: models may hold submodules deliberately in another mode (a frozen
BN in eval inside a training model, a teacher kept in eval), and model.train() would overwrite them all.
"""
from contextlib import contextmanager

from torch import nn

BN_MODES = ('eval', 'train', 'keep')


@contextmanager
def bn_mode(model: nn.Module, mode: str):
    """Run the block with model.train(mode == 'train'); 'keep' leaves every flag as it is."""
    if mode not in BN_MODES:
        raise ValueError(f"unknown bn mode {mode!r}; valid modes: {', '.join(BN_MODES)}")
    if mode == 'keep':
        yield
        return
    flags = [(m, m.training) for m in model.modules()]
    model.train(mode == 'train')
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training
