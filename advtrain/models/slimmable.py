"""Width slimming (Yu et al., "Slimmable Neural Networks", ICLR 2019) over OAT's conditioned BN: the building blocks
of OATS (Wang et al., NeurIPS 2020), put into advtrain's BatchNorm architectures in place (`slim`), with no
architecture-specific copies.

At width w a layer of C output channels uses its first ceil(w C) (`channels`), and reads the first channels of its
input as the previous layer produced them (the input's own size), so residual additions stay shape-consistent at
every width: both branches of a block end in layers of the same C, hence the same ceil(w C). The image's channels
and the classifier's classes never slim: the first conv reads the whole image, the head reads the first features.

- `SlimConv2d`, `SlimLinear`: nn.Conv2d / nn.Linear with the same parameters (their names and values unchanged),
  sliced per forward; a Linear inside the body slims its outputs too, the head (`slim_out=False`) does not. After a
  Flatten the first features are the first channels' pixels (flattening is channel-major), so a Linear there reads
  exactly what the slimmed conv before it produced.
- `SlimFiLMDualBN`: a dual BN per width, so every width keeps its own BN statistics (the authors'
  SwitchableDualBN2d; a BN shared across widths does not work, says their own docstring), and one FiLM shared by the
  widths, each reading its first channels' scale and shift (the authors' FiLM layers are sliced, not per width).

The condition of a forward is `Slim(width, lambdas)`: the whole batch at one width, lambda per example as in OAT.
`FixedSlim` is one (width, lambda) for a batch of any size (evaluation views, attacks that sub-batch).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .classifier import Classifier, Conditional, replace_modules
from .conditioned_bn import FiLMDualBN, FixedLambda, Lambdas, film_mlp, modulate

# The architectures whose every channel count follows from conv/linear outputs and whose BatchNorm layers OATS
# conditions (the ones without BatchNorm, such as mnist_net, have nothing for the per-width statistics to live in).
SLIMMABLE_ARCHS = ("bn_cnn", "preact_resnet18", "resnet18", "resnet34", "resnet50", "wrn16_8", "wrn28_10", "wrn34_10")


def channels(c: int, width: float) -> int:
    """ceil(width * c), the channels a layer of c uses at `width` (rounded first: 0.7 * 10 is 7, not 8)."""
    return max(1, math.ceil(round(width * c, 6)))


@dataclass
class Slim:
    """A forward's condition: one width for the batch, per-example lambdas with their routing."""
    width: float
    lambdas: Lambdas


@dataclass(frozen=True)
class FixedSlim:
    """One (width, lambda) for every example of a batch of any size (advtrain.models.bind broadcasts it)."""
    width: float
    lam: FixedLambda

    def for_batch(self, n: int, device) -> Slim:
        return Slim(self.width, self.lam.for_batch(n, device))


def _width(cond) -> float:
    return 1.0 if cond is None else cond.width


class SlimConv2d(nn.Conv2d, Conditional):
    def forward(self, x: Tensor) -> Tensor:
        out = channels(self.out_channels, _width(self.condition))
        bias = None if self.bias is None else self.bias[:out]
        return self._conv_forward(x, self.weight[:out, : x.shape[1]], bias)


class SlimLinear(nn.Linear, Conditional):
    slim_out: bool = True  # False for the head: the classes never slim

    def forward(self, x: Tensor) -> Tensor:
        out = channels(self.out_features, _width(self.condition)) if self.slim_out else self.out_features
        bias = None if self.bias is None else self.bias[:out]
        return nn.functional.linear(x, self.weight[:out, : x.shape[-1]], bias)


class SlimFiLMDualBN(Conditional):
    """A dual BN per width over that width's first channels of `bn` (its settings and initial values), and one
    full-width FiLM whose first channels each width reads."""

    def __init__(self, bn: nn.BatchNorm2d, widths: Sequence[float], lambdas: Sequence[float], encoding: Tensor):
        super().__init__()
        self.widths = tuple(float(w) for w in widths)
        self.per_width = nn.ModuleList(FiLMDualBN(_first_channels(bn, channels(bn.num_features, w)), lambdas,
                                                  encoding, film=False) for w in self.widths)
        self.register_buffer("encoding", encoding.clone())
        self.film = film_mlp(encoding.shape[1], bn.num_features)

    def forward(self, x: Tensor) -> Tensor:
        cond = self.condition
        if not isinstance(cond, Slim):
            raise ValueError("an OATS model needs its width and lambdas: model(x, cond=Slim(width, Lambdas.of(...)))"
                             " or advtrain.models.bind(model, FixedSlim(width, FixedLambda(...)))")
        block = self.per_width[width_index(self.widths, cond.width)]
        block.condition = cond.lambdas  # the inner dual BN reads lambdas only, for this call
        try:
            out = block(x)
        finally:
            block.condition = None
        return modulate(out, self.film(self.encoding[cond.lambdas.index].to(x.dtype)))


def width_index(widths: Sequence[float], width: float) -> int:
    for i, w in enumerate(widths):
        if math.isclose(w, width):
            return i
    raise ValueError(f"width must be one of {list(widths)}; got {width}")


def _first_channels(bn: nn.BatchNorm2d, c: int) -> nn.BatchNorm2d:
    part = nn.BatchNorm2d(c, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                          track_running_stats=bn.track_running_stats)
    with torch.no_grad():
        for name, tensor in part.state_dict().items():
            source = bn.state_dict()[name]
            tensor.copy_(source if source.ndim == 0 else source[:c])
    return part


def slim(model: Classifier, widths: Sequence[float], lambdas: Sequence[float], encoding: Tensor) -> int:
    """Make `model` slimmable in place: its body's convs and linears slice by width, its BatchNorm2d become one OAT
    block per width, its head reads the first features. Returns how many BatchNorm layers were replaced."""
    layers = [m for m in model.body.modules() if type(m) in (nn.Conv2d, nn.Linear)]
    if any(isinstance(m, nn.Conv2d) and m.groups != 1 for m in layers):
        raise ValueError("a grouped convolution cannot be slimmed by its first channels")
    # A class swap, not a copy: the same Parameters (values, init, device) and no draw from the RNG. Before the BN
    # replacement, so the FiLM MLPs it brings in stay plain Linears.
    for layer in layers:
        layer.__class__ = SlimConv2d if isinstance(layer, nn.Conv2d) else SlimLinear
    model.head.__class__ = SlimLinear
    model.head.slim_out = False
    return replace_modules(model.body, lambda name, m: isinstance(m, nn.BatchNorm2d),
                           lambda name, m: SlimFiLMDualBN(m, widths, lambdas, encoding))
