"""BatchNorm conditioned on a per-example trade-off parameter lambda: the building block of OAT (Wang et al.,
"Once-for-All Adversarial Training", NeurIPS 2020), for any architecture that has BatchNorm.

`FiLMDualBN` replaces one nn.BatchNorm2d:
- dual BN: examples with lambda = 0 go through BN_clean, examples with lambda > 0 through BN_adv, routed per
  example by their lambda (the authors' code routes by position in the batch, which breaks as soon as a batch is
  shuffled or sub-batched); a BN that no example of a batch reaches is not called, so its statistics stay put;
- FiLM: an MLP maps lambda's encoding to a per-channel scale and shift, out = x * leaky_relu(mu) + leaky_relu(sigma)
  (the authors' FiLM_Layer: Linear(d, 2C), LeakyReLU, Linear(2C, 2C), no identity initialisation).

The encoding of each lambda of the set is a row of a seeded random orthogonal matrix (the authors' default, there
unseeded and kept in a .npy file beside the checkpoint): here a buffer of every block, so it travels inside the
checkpoint and survives save and load bit for bit.

The condition a forward takes is `Lambdas`: the per-example values with their routing worked out on the host (which
rows are lambda = 0, each row's position in the set), so no BN layer waits on the device to learn a batch's split.
`FixedLambda(0.3)` is one lambda for a batch of any size (evaluation views, attacks that sub-batch).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .classifier import Conditional


@dataclass
class Lambdas:
    """Per-example lambdas and their routing: `index` (N,) each row's position in the set; `clean`/`other` the rows
    with lambda = 0 / lambda > 0 (None where there is none)."""
    values: Tensor
    index: Tensor
    clean: Tensor | None
    other: Tensor | None

    @classmethod
    def of(cls, values: Sequence[float] | Tensor, lambdas: Sequence[float], device) -> "Lambdas":
        """From values known on the host (the sampled lambdas; a view's): checked against the set once, here."""
        values = torch.as_tensor(values, dtype=torch.float32).reshape(-1).cpu()
        grid = torch.tensor([float(v) for v in lambdas])
        index = (values[:, None] - grid[None, :]).abs().argmin(dim=1)
        if not torch.allclose(grid[index], values):
            raise ValueError(f"lambda must be one of {grid.tolist()}; got {sorted(set(values.tolist()))}")
        clean = (values == 0).nonzero().flatten()
        other = (values != 0).nonzero().flatten()
        return cls(values.to(device), index.to(device), clean.to(device) if len(clean) else None,
                   other.to(device) if len(other) else None)

    def __len__(self) -> int:
        return len(self.values)


@dataclass(frozen=True)
class FixedLambda:
    """One lambda for every example of a batch of any size (advtrain.models.bind broadcasts it)."""
    value: float
    lambdas: tuple[float, ...]

    def for_batch(self, n: int, device) -> Lambdas:
        return Lambdas.of([self.value] * n, self.lambdas, device)


def orthogonal_encoding(n: int, dim: int, seed: int) -> Tensor:
    """(n, dim): the first n rows of a random orthogonal dim x dim matrix (QR of a seeded Gaussian)."""
    if n > dim:
        raise ValueError(f"{n} lambdas need an encoding of at least {n} dimensions, not {dim}")
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    return q[:n].float().contiguous()  # the checkpoint keeps these very numbers: LAPACK's last bits can vary


def film_mlp(encoding_dim: int, channels: int) -> nn.Sequential:
    """The authors' FiLM_Layer: lambda's encoding -> (mu, sigma), a scale and a shift per channel."""
    return nn.Sequential(nn.Linear(encoding_dim, 2 * channels), nn.LeakyReLU(), nn.Linear(2 * channels, 2 * channels))


def modulate(x: Tensor, film_out: Tensor) -> Tensor:
    """x * leaky_relu(mu) + leaky_relu(sigma) over x's channels, the FiLM output's first ones (OATS' narrower
    widths read the first channels of the full-width FiLM, as the authors' sliced FiLM layers)."""
    mu, sigma = film_out.chunk(2, dim=1)
    c = x.shape[1]
    return x * F.leaky_relu(mu[:, :c])[:, :, None, None] + F.leaky_relu(sigma[:, :c])[:, :, None, None]


class FiLMDualBN(Conditional):
    """`film=False`: the dual BN alone (OATS' per-width BNs, which share one FiLM across widths)."""

    def __init__(self, bn: nn.BatchNorm2d, lambdas: Sequence[float], encoding: Tensor, film: bool = True):
        super().__init__()
        channels = bn.num_features

        def copy_of(source: nn.BatchNorm2d) -> nn.BatchNorm2d:
            twin = nn.BatchNorm2d(channels, eps=source.eps, momentum=source.momentum, affine=source.affine,
                                  track_running_stats=source.track_running_stats)
            twin.load_state_dict(source.state_dict())
            return twin

        self.bn_clean, self.bn_adv = copy_of(bn), copy_of(bn)
        self.register_buffer("lambdas", torch.tensor([float(v) for v in lambdas]))
        self.register_buffer("encoding", encoding.clone())
        self.film = film_mlp(encoding.shape[1], channels) if film else None

    def forward(self, x: Tensor) -> Tensor:
        lam = self.condition
        if not isinstance(lam, Lambdas):
            raise ValueError("an OAT model needs its lambdas: model(x, cond=Lambdas.of(...)) or "
                             "advtrain.models.bind(model, FixedLambda(...))")
        if lam.clean is None:  # one BN for the whole batch: no copies
            out = self.bn_adv(x)
        elif lam.other is None:
            out = self.bn_clean(x)
        else:
            out = torch.empty_like(x)
            out[lam.clean] = self.bn_clean(x.index_select(0, lam.clean))
            out[lam.other] = self.bn_adv(x.index_select(0, lam.other))
        if self.film is None:
            return out
        return modulate(out, self.film(self.encoding[lam.index].to(x.dtype)))
