"""Image classifiers for adversarial training: one registry of architectures, each built into a `Classifier` that
takes [0,1] pixels and normalizes them itself.

    model = build_model("wrn34_10", num_classes=10, in_shape=(3, 32, 32),
                        mean=(0.4914, 0.4822, 0.4465), std=(0.2471, 0.2435, 0.2616))

A builder in ARCHS takes (in_shape, num_classes) plus the keyword-only options it understands (depth,
widen_factor, dropout) and returns (body, head); build_model rejects any option the chosen builder does not take, or
a value it cannot build, and check_arch says the same without building anything (the config checks call it).
"""

import inspect
from collections.abc import Callable, Sequence
from functools import partial

from torch import nn

from advtrain.errors import ConfigError

from .classifier import (Bound, Classifier, Conditional, Normalize, bind, count_parameters, find_head,
                         replace_modules, unwrap)
from .flops import forward_flops
from .preact_resnet import check_preact_resnet, preact_resnet
from .resnet import check_resnet, resnet
from .small_cnns import bn_cnn, madry_cnn, mnist_net, trades_smallcnn
from .wide_resnet import check_wide_resnet, wide_resnet

__all__ = [
    "ARCHS", "Bound", "Classifier", "Conditional", "Normalize", "bind", "build_model", "check_arch", "count_parameters",
    "find_head", "forward_flops", "replace_modules", "unwrap",
]

ARCHS: dict[str, Callable[..., tuple[nn.Module, nn.Linear]]] = {
    "bn_cnn": bn_cnn,
    "madry_cnn": madry_cnn,
    "mnist_net": mnist_net,
    "trades_smallcnn": trades_smallcnn,
    "preact_resnet18": partial(preact_resnet, depth=18),
    "resnet18": partial(resnet, depth=18),
    "resnet34": partial(resnet, depth=34),
    "resnet50": partial(resnet, depth=50),
    "wrn34_10": partial(wide_resnet, depth=34, widen_factor=10),
    "wrn28_10": partial(wide_resnet, depth=28, widen_factor=10),
    "wrn16_8": partial(wide_resnet, depth=16, widen_factor=8),
}

# build_model's option defaults; only options that differ from these are forwarded to (and checked against) a builder.
_OPTION_DEFAULTS = {"depth": None, "widen_factor": None, "dropout": 0.0}
# The option values each builder can build, checked without building it.
_CHECKS = {preact_resnet: check_preact_resnet, resnet: check_resnet, wide_resnet: check_wide_resnet}


def check_arch(name: str, *, depth: int | None = None, widen_factor: int | None = None, dropout: float = 0.0) -> dict:
    """The options registry entry `name` is built with (those that differ from the defaults); raises ConfigError,
    naming the option and what is valid, for an unknown name, an option the builder does not take or a value it
    cannot build."""
    if name not in ARCHS:
        raise ConfigError(f"unknown arch {name!r}; valid: {', '.join(ARCHS)}")
    builder = ARCHS[name]
    options = {"depth": depth, "widen_factor": widen_factor, "dropout": dropout}
    options = {key: value for key, value in options.items() if value != _OPTION_DEFAULTS[key]}
    accepted = [key for key in _OPTION_DEFAULTS if key in inspect.signature(builder).parameters]
    for key, value in options.items():
        if key not in accepted:
            raise ConfigError(f"arch {name!r} does not take {key}={value!r}; it takes: {', '.join(accepted) or 'none'}")
    check = _CHECKS.get(getattr(builder, "func", builder))
    if check is not None:
        check(**{**getattr(builder, "keywords", {}), **options})
    return options


def build_model(
    name: str,
    *,
    num_classes: int,
    in_shape: tuple[int, int, int],
    mean: Sequence[float],
    std: Sequence[float],
    depth: int | None = None,
    widen_factor: int | None = None,
    dropout: float = 0.0,
) -> Classifier:
    """Build registry entry `name` for inputs of in_shape = (C, H, W); mean/std have C values or one to broadcast."""
    options = check_arch(name, depth=depth, widen_factor=widen_factor, dropout=dropout)
    builder = ARCHS[name]

    in_shape = tuple(int(size) for size in in_shape)
    if len(in_shape) != 3 or min(in_shape) < 1:
        raise ValueError(f"in_shape must be (C, H, W) with positive sizes, got {in_shape}")
    normalize = Normalize(_per_channel("mean", mean, in_shape[0]), _per_channel("std", std, in_shape[0]))
    body, head = builder(in_shape, num_classes, **options)
    return Classifier(normalize, body, head, arch=name)


def _per_channel(what: str, values: Sequence[float], channels: int) -> list[float]:
    values = [float(v) for v in values]
    if len(values) not in (1, channels):
        raise ValueError(f"{what} has {len(values)} values; valid: 1 or {channels} (the input's channels)")
    return values * (channels // len(values))
