"""ImageNet-style class folders, streamed from disk through a torch DataLoader with worker processes.

Layout: <root>/train/<class>/*.jpg for training and <root>/val/<class>/* as the test set (the usual ImageNet naming);
the classes of the two must match. Training: RandomResizedCrop(image_size) and a horizontal flip; evaluation:
Resize(int(image_size * 1.14)) and CenterCrop(image_size). Workers send uint8 tensors (a quarter of float32's bytes);
pixels become float32 in [0,1] on the device.

Resuming: the order of epoch e is a permutation seeded by (seed, e), so a resumed epoch visits the remaining images
in the same order. The random crops and flips, drawn in the workers, are NOT bit-identical to the uninterrupted
epoch's: they depend on which worker gets which batch (and with workers=0 on torch's global generator).
"""

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import default_loader
from torchvision.transforms import v2

from .errors import DataError
from .loader import Batch, batches_per_epoch, shard, to_unit

RESIZE_RATIO = 1.14  # evaluation resize before the center crop (256/224, the ImageNet convention)


def list_images(root: Path) -> tuple[list[tuple[str, int]], list[tuple[str, int]], list[str]]:
    """(train samples, test samples, class names); a sample is (path, label)."""
    found = {}
    for split in ("train", "val"):
        try:
            found[split] = ImageFolder(str(root / split))
        except (FileNotFoundError, NotADirectoryError) as e:
            raise DataError(
                f"imagefolder: {e}; expected <root>/train/<class>/*.jpg and <root>/val/<class>/* under {root} "
                "(this dataset cannot be downloaded: put the images there by hand)"
            ) from e
    if found["train"].classes != found["val"].classes:
        raise DataError(f"imagefolder: the class folders of {root / 'train'} and {root / 'val'} differ")
    return found["train"].samples, found["val"].samples, found["train"].classes


def train_transform(image_size: int, flip: bool) -> v2.Compose:
    flips = [v2.RandomHorizontalFlip()] if flip else []
    return v2.Compose([v2.RandomResizedCrop(image_size, antialias=True), *flips, v2.PILToTensor()])


def eval_transform(image_size: int) -> v2.Compose:
    return v2.Compose(
        [v2.Resize(int(image_size * RESIZE_RATIO), antialias=True), v2.CenterCrop(image_size), v2.PILToTensor()]
    )


class _Images(Dataset):
    """(uint8 image (3,S,S), label, position in this split) for every sample."""

    def __init__(self, samples: list[tuple[str, int]], transform):
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        try:
            image = default_loader(path)
        except OSError as e:  # PIL's UnidentifiedImageError is an OSError
            raise DataError(f"{path}: cannot read the image ({e})") from e
        return self.transform(image), label, i


class _Order(Sampler):
    """The batches (lists of positions) the current epoch still has to load on this rank; set before each pass, so
    that persistent workers can stay alive across epochs."""

    def __init__(self):
        self.batches: list[list[int]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _on_device(batches, device: torch.device):
    try:
        for x, *rest in batches:
            yield to_unit(x.to(device, non_blocking=True)), *(t.to(device, non_blocking=True) for t in rest)
    except DataError as e:
        # A worker re-raises with its whole traceback in the message; the user needs only our line at the end.
        raise DataError(str(e).rsplit("DataError: ", 1)[-1]) from e


class FolderTrainLoader:
    """Streams the training images with workers; Batch.crop and Batch.flip are None (the workers crop and flip each
    image on its own, at its own size, before batching). With several ranks each loads only its shard of every
    global batch (see TensorTrainLoader)."""

    def __init__(self, samples, *, image_size: int, flip: bool, batch_size: int, workers: int, device, seed: int,
                 rank: int = 0, world_size: int = 1):
        self.n_examples = len(samples)
        self.batch_size, self.device, self.seed = batch_size, device, seed
        self.rank, self.world_size = rank, world_size
        self._epoch = -1
        self._order = _Order()
        self._eval_dataset = _Images(samples, eval_transform(image_size))
        self._loader = DataLoader(
            _Images(samples, train_transform(image_size, flip)),
            batch_sampler=self._order,
            num_workers=workers,
            pin_memory=device.type == "cuda",
            persistent_workers=workers > 0,
            generator=torch.Generator().manual_seed(seed),  # seeds the workers' augmentation
        )

    def __len__(self) -> int:
        return batches_per_epoch(self.n_examples, self.batch_size, self.world_size)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        self._epoch = epoch
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n_examples).tolist()
        batches = [order[b * self.batch_size : (b + 1) * self.batch_size] for b in range(start_batch, len(self))]
        self._order.batches = [batch[shard(len(batch), self.rank, self.world_size)] for batch in batches]
        weights = [len(mine) * self.world_size / len(batch) for mine, batch in zip(self._order.batches, batches)]
        for (x, y, index), weight in zip(_on_device(self._loader, self.device), weights):
            yield Batch(x, y, index, None, None, weight)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self._epoch}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self._epoch = state["seed"], state["epoch"]

    def fixed_batch(self, n: int) -> tuple[Tensor, Tensor]:
        items = [self._eval_dataset[i] for i in range(min(n, self.n_examples))]
        x = torch.stack([image for image, _, _ in items]).to(self.device)
        return to_unit(x), torch.tensor([label for _, label, _ in items], device=self.device)


class FolderEvalSet:
    """Validation or test images in a fixed order, evaluation transform only."""

    def __init__(self, samples, *, image_size: int, workers: int, device):
        self.samples, self.image_size, self.workers, self.device = samples, image_size, workers, device
        self.n_examples = len(samples)

    def batches(self, batch_size: int, n: int | None = None, rank: int = 0,
                world_size: int = 1) -> Iterator[tuple[Tensor, Tensor]]:
        samples = self.samples[:n]
        images = _Images(samples[shard(len(samples), rank, world_size)], eval_transform(self.image_size))
        loader = DataLoader(
            images, batch_size=batch_size, num_workers=self.workers, pin_memory=self.device.type == "cuda"
        )
        for x, y, _ in _on_device(loader, self.device):
            yield x, y
