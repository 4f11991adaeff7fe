"""One attack engine for training methods and evaluation, plus the AutoAttack adapter and the suite builder."""
from .autoattack import AutoAttackEval
from .engine import fgsm, pgd
from .geometry import project, random_init
from .modes import bn_mode
from .passes import PassCounter
from .suite import build_attack

__all__ = ['AutoAttackEval', 'PassCounter', 'bn_mode', 'build_attack', 'fgsm', 'pgd', 'project', 'random_init']
