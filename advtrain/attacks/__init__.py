"""The attacks: projected gradient attacks for training methods and evaluation, the AutoAttack adapter, the suite."""
from .autoattack import AutoAttackEval
from .projected import fgsm, pgd
from .geometry import project, random_init
from .modes import bn_mode
from .passes import PassCounter
from .suite import build_attack

__all__ = ['AutoAttackEval', 'PassCounter', 'bn_mode', 'build_attack', 'fgsm', 'pgd', 'project', 'random_init']
