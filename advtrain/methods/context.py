"""What a training method sees of the loop: the contract's types, owned by the methods package.

The engine implements `MethodContext` (advtrain.engine.context.TrainContext); a method never imports the engine.
"""
from __future__ import annotations

from typing import Any, Callable, ContextManager, Protocol, Sequence

import torch
from torch import Tensor, nn


class Ranks(Protocol):
    """The processes training together; a decision a method takes must agree on all of them."""
    enabled: bool
    rank: int
    world_size: int

    def mean(self, value: float) -> float: ...

    def sum(self, values: list[float]) -> list[float]: ...


class MethodContext(Protocol):
    model: nn.Module                 # what the update runs through (compiled, DDP-wrapped): ONE forward and ONE
                                     # backward through it per update
    attack_model: nn.Module          # the plain module: attacks take input-only gradients through it
    optimizer: torch.optim.Optimizer
    counter: Any                     # advtrain.attacks.PassCounter: the cost accounting
    device: torch.device
    autocast: Callable[[], ContextManager]  # the forward passes' precision
    epochs: int
    batches_per_epoch: int
    epoch: int
    batch_idx: int
    updates: int
    dist: Ranks
    fixed_batch: Callable[[int], tuple[Tensor, Tensor]] | None  # the first n training examples, unaugmented
    companions: dict[str, nn.Module]  # the frozen models the method named in companions(), ready on the device

    @property
    def progress(self) -> float: ...  # fraction of training done at the start of the current batch

    def update(self, loss: Tensor, inputs: Sequence[Tensor] = ()) -> list[Tensor]: ...  # backward + step

    def backward(self, loss: Tensor, inputs: Sequence[Tensor] = (), *, last: bool = True) -> list[Tensor]: ...

    def step(self) -> None: ...

    def request_stop(self, reason: str) -> None: ...

    def warn(self, message: str) -> None: ...  # one line on the console (rank 0), e.g. a guard that only warns
