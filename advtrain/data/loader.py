"""The loader interface the training engine sees, and its device-resident implementation for small datasets.

Small datasets live on the training device as one uint8 tensor (N,C,H,W); a batch becomes float32 in [0,1] only
when it is yielded. Shuffling and augmentation draw from the loader's own torch.Generator on that device, in a
fixed order (one permutation per epoch, then crop offsets and flips per batch), which is what makes an interrupted
epoch resumable bit for bit from state_dict().
"""

from collections.abc import Iterator
from typing import NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor

from advtrain.errors import ConfigError

from .augment import apply_augmentation, sample_augmentation
from .errors import DataError


class Batch(NamedTuple):
    x: Tensor  # float32 in [0,1], (B,C,H,W), on the device
    y: Tensor  # int64 (B,)
    index: Tensor  # int64 (B,): the example's row in the training split, for per-example state
    crop: Tensor | None  # int64 (B,2): (dy, dx) of the crop window in the zero-padded image; None without crops
    flip: Tensor | None  # bool (B,): mirrored left-right after cropping; None without flips
    # This rank's share of the global batch's loss: rows here * world size / rows in the global batch. 1.0 unless
    # the ranks' shards differ in size (the last batch of an epoch); the update scales the loss by it so that DDP's
    # average over ranks is the global batch's mean.
    weight: float = 1.0


@runtime_checkable
class TrainLoader(Protocol):
    n_examples: int

    def __len__(self) -> int: ...  # batches per epoch, the last partial batch included

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def fixed_batch(self, n: int) -> tuple[Tensor, Tensor]: ...


@runtime_checkable
class EvalSet(Protocol):
    n_examples: int

    def batches(self, batch_size: int, n: int | None = None, rank: int = 0,
                world_size: int = 1) -> Iterator[tuple[Tensor, Tensor]]: ...


def shard(n: int, rank: int, world_size: int) -> slice:
    """Rank `rank`'s contiguous share of n rows: sizes differ by at most one, rank order follows row order."""
    return slice(n * rank // world_size, n * (rank + 1) // world_size)


def batches_per_epoch(n_examples: int, batch_size: int, world_size: int) -> int:
    """Global batches per epoch, the last partial one included unless it has fewer rows than there are ranks.

    A batch larger than the training set is refused: each epoch would be one update, and the schedules (an LR and an
    eps warm-up from 0 at the start of training) would spend the run's few updates at or near zero. It is checked
    here, when training first asks how long an epoch is (before any file of the run is written), rather than when
    the data is built, because advtrain-eval builds the same loader with its evaluation batch size."""
    if batch_size > n_examples:
        raise ConfigError(f"trainer.batch_size={batch_size} is larger than the {n_examples} training examples (after "
                          f"dataset.train_subset and dataset.val_size): choose at most {n_examples}")
    full, rest = divmod(n_examples, batch_size)
    return full + (1 if rest >= world_size else 0)


def to_unit(images: Tensor) -> Tensor:
    """uint8 pixels -> float32 in [0,1]."""
    return images.float().div_(255)


class TensorTrainLoader:
    """A training split held on the device, shuffled and augmented there in batches.

    With several ranks every rank holds the whole split and draws the same permutation and augmentation from the same
    seed, then keeps its contiguous shard of each global batch of `batch_size` rows: the ranks' shards are disjoint,
    and together they are exactly the batch a single process would train on.
    """

    def __init__(self, images: Tensor, labels: Tensor, *, batch_size: int, crop_padding: int, flip: bool, seed: int,
                 rank: int = 0, world_size: int = 1):
        self.images, self.labels = images, labels  # uint8 (N,C,H,W) and int64 (N,), on the training device
        self.n_examples = len(labels)
        self.batch_size, self.crop_padding, self.flip = batch_size, crop_padding, flip
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator(device=images.device).manual_seed(seed)
        self._epoch, self._next_batch = -1, 0
        self._permutation = torch.empty(0, dtype=torch.int64, device=images.device)

    def __len__(self) -> int:
        return batches_per_epoch(self.n_examples, self.batch_size, self.world_size)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """The epoch's batches from start_batch on. start_batch=0 draws a new permutation; start_batch > 0 continues
        the epoch that state_dict() was taken in (after load_state_dict when resuming in a fresh process)."""
        if start_batch == 0:
            self._permutation = torch.randperm(
                self.n_examples, generator=self.generator, device=self.generator.device
            )
            self._epoch, self._next_batch = epoch, 0
        elif (epoch, start_batch) != (self._epoch, self._next_batch):
            raise ValueError(
                f"cannot continue epoch {epoch} at batch {start_batch}: the loader stands at epoch {self._epoch}, "
                f"batch {self._next_batch}"
            )
        return self._batches(start_batch)

    def _batches(self, start_batch: int) -> Iterator[Batch]:
        for b in range(start_batch, len(self)):
            index = self._permutation[b * self.batch_size : (b + 1) * self.batch_size]
            # Drawn only when the batch is requested, so state_dict() between batches marks an exact resume point.
            crop, flip = sample_augmentation(len(index), self.crop_padding, self.flip, self.generator)
            self._next_batch = b + 1
            mine = shard(len(index), self.rank, self.world_size)
            weight = (mine.stop - mine.start) * self.world_size / len(index)
            index, crop, flip = index[mine], _rows(crop, mine), _rows(flip, mine)
            x = to_unit(apply_augmentation(self.images[index], crop, flip, self.crop_padding))
            yield Batch(x, self.labels[index], index, crop, flip, weight)

    def state_dict(self) -> dict:
        return {
            "generator": self.generator.get_state(),
            "epoch": self._epoch,
            "next_batch": self._next_batch,
            "permutation": self._permutation.cpu(),
            "n_examples": self.n_examples,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["n_examples"] != self.n_examples:
            raise DataError(
                f"the checkpoint's data loader covered {state['n_examples']} training examples, this run has "
                f"{self.n_examples}; resume with the same dataset settings (train_subset, val_size)"
            )
        self.generator.set_state(state["generator"].cpu())
        self._epoch, self._next_batch = state["epoch"], state["next_batch"]
        self._permutation = state["permutation"].to(self.images.device)

    def fixed_batch(self, n: int) -> tuple[Tensor, Tensor]:
        return to_unit(self.images[:n]), self.labels[:n]


def _rows(t: Tensor | None, rows: slice) -> Tensor | None:
    return None if t is None else t[rows]


class TensorEvalSet:
    """A validation or test split held on the device; batches in a fixed order, without augmentation."""

    def __init__(self, images: Tensor, labels: Tensor):
        self.images, self.labels = images, labels
        self.n_examples = len(labels)

    def batches(self, batch_size: int, n: int | None = None, rank: int = 0,
                world_size: int = 1) -> Iterator[tuple[Tensor, Tensor]]:
        """The first n examples (all when n is None or larger than the split); with several ranks, this rank's
        contiguous share of them."""
        n = self.n_examples if n is None else min(n, self.n_examples)
        rows = shard(n, rank, world_size)
        for start in range(rows.start, rows.stop, batch_size):
            stop = min(start + batch_size, rows.stop)
            yield to_unit(self.images[start:stop]), self.labels[start:stop]
