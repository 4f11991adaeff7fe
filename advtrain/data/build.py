"""build_data: config -> dataset description, training loader, validation split and test set.

Config keys read (dataset group): name, root, download, check_md5, train_subset, val_size, crop_padding, flip, mean,
std; synthetic also num_classes, shape, n_train, n_test, noise (and not root, download, check_md5); imagefolder also
image_size, workers (and not download, check_md5, crop_padding).
"""

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from .cifar import read_cifar
from .errors import DataError
from .imagefolder import FolderEvalSet, FolderTrainLoader, list_images
from .loader import EvalSet, TensorEvalSet, TensorTrainLoader, TrainLoader
from .mnist import read_mnist
from .svhn import read_svhn
from .synthetic import make_synthetic

_READERS = {  # name -> (reader(root, download=, check=), number of classes)
    "mnist": (partial(read_mnist, "mnist"), 10),
    "fashion_mnist": (partial(read_mnist, "fashion_mnist"), 10),
    "cifar10": (partial(read_cifar, "cifar10"), 10),
    "cifar100": (partial(read_cifar, "cifar100"), 100),
    "svhn": (read_svhn, 10),
}
_SPLIT_STREAM = 1  # the validation split's stream of the run seed, independent of shuffling and synthetic data
# What the official files hold, known before reading them, so the config checks can compare eval.n and mean/std
# with them before a run starts (imagefolder converts every image to RGB; its test set is counted only when read).
_CHANNELS = {"mnist": 1, "fashion_mnist": 1, "cifar10": 3, "cifar100": 3, "svhn": 3, "imagefolder": 3}
_TEST_SIZES = {"mnist": 10000, "fashion_mnist": 10000, "cifar10": 10000, "cifar100": 10000, "svhn": 26032}


def known_sizes(cfg) -> tuple[int | None, int | None]:
    """(image channels, test examples) of the dataset section `cfg` as far as they are known without reading any
    file; None where they are not (an image folder's test set, a synthetic shape not given)."""
    if cfg.get("name") == "synthetic":
        shape = cfg.get("shape")
        return (int(shape[0]) if shape else None), cfg.get("n_test")
    return _CHANNELS.get(cfg.get("name")), _TEST_SIZES.get(cfg.get("name"))


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    shape: tuple[int, int, int]  # (C,H,W) of the images the model sees
    mean: tuple[float, ...]  # per channel, pixel units of [0,1]; for the model's Normalize layer
    std: tuple[float, ...]
    n_train: int
    n_val: int
    n_test: int
    crop_padding: int = 0  # of the training loader's random crops (Batch.crop offsets lie in [0, 2 * crop_padding])


@dataclass
class Data:
    info: DatasetInfo
    train: TrainLoader
    val: EvalSet | None
    test: EvalSet


def split_rows(n: int, train_subset: int | None, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the training file used for training and for validation: the first train_subset rows (all when None),
    of which a seeded random val_size are held out. Both lists are sorted, so their order follows the file."""
    n_used = n if train_subset is None else train_subset
    if not 0 < n_used <= n:
        raise DataError(f"dataset.train_subset={train_subset} must be between 1 and the {n} training examples")
    if not 0 <= val_size < n_used:
        raise DataError(
            f"dataset.val_size={val_size} must be at least 0 and leave some of the {n_used} training examples"
        )
    permutation = np.random.default_rng([seed, _SPLIT_STREAM]).permutation(n_used)
    return np.sort(permutation[val_size:]), np.sort(permutation[:val_size])


def build_data(cfg, *, device: torch.device, seed: int, batch_size: int, rank: int = 0, world_size: int = 1) -> Data:
    """Reads (or generates) the dataset named by cfg.name and puts it behind the loader interface on `device`.

    batch_size is the global batch; with several ranks the training loader yields this rank's shard of it.
    """
    device = torch.device(device)
    ranks = {"rank": rank, "world_size": world_size}
    if cfg.name == "imagefolder":
        return _build_imagefolder(cfg, device, seed, batch_size, ranks)
    if cfg.name == "synthetic":
        shape = tuple(int(v) for v in cfg.shape)
        num_classes = cfg.num_classes
        train_x, train_y, test_x, test_y = make_synthetic(
            num_classes=num_classes, shape=shape, n_train=cfg.n_train, n_test=cfg.n_test, noise=cfg.noise, seed=seed
        )
    elif cfg.name in _READERS:
        read, num_classes = _READERS[cfg.name]
        train_x, train_y, test_x, test_y = read(_root(cfg), download=cfg.download, check=cfg.check_md5)
    else:
        names = ", ".join([*_READERS, "imagefolder", "synthetic"])
        raise DataError(f"unknown dataset.name={cfg.name!r}; choose one of {names}")

    train_rows, val_rows = split_rows(len(train_y), cfg.train_subset, cfg.val_size, seed)
    info = _info(cfg, num_classes, tuple(train_x.shape[1:]), len(train_rows), len(val_rows), len(test_y))

    def on_device(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(device)

    train = TensorTrainLoader(
        on_device(train_x[train_rows]), on_device(train_y[train_rows]),
        batch_size=batch_size, crop_padding=cfg.crop_padding, flip=cfg.flip, seed=seed, **ranks,
    )
    val = TensorEvalSet(on_device(train_x[val_rows]), on_device(train_y[val_rows])) if len(val_rows) else None
    return Data(info, train, val, TensorEvalSet(on_device(test_x), on_device(test_y)))


def _root(cfg) -> Path:
    root = Path(cfg.root).expanduser()
    if root.exists() and not root.is_dir():
        raise DataError(f"dataset.root={cfg.root} is a file; it must be the folder that holds the dataset's files "
                        f"(for {cfg.name}: {_LAYOUT.get(cfg.name, 'see README')})")
    return root


_LAYOUT = {"mnist": "<root>/MNIST/raw/", "fashion_mnist": "<root>/FashionMNIST/raw/",
           "cifar10": "<root>/cifar-10-batches-py/", "cifar100": "<root>/cifar-100-python/",
           "svhn": "<root>/train_32x32.mat, test_32x32.mat", "imagefolder": "<root>/train/<class>/, <root>/val/<class>/"}


def _build_imagefolder(cfg, device: torch.device, seed: int, batch_size: int, ranks: dict) -> Data:
    train_samples, test_samples, classes = list_images(_root(cfg))
    train_rows, val_rows = split_rows(len(train_samples), cfg.train_subset, cfg.val_size, seed)
    shape = (3, cfg.image_size, cfg.image_size)  # the folder loader converts every image to RGB
    info = _info(cfg, len(classes), shape, len(train_rows), len(val_rows), len(test_samples))
    evaluation = dict(image_size=cfg.image_size, workers=cfg.workers, device=device)
    train = FolderTrainLoader(
        [train_samples[r] for r in train_rows],
        image_size=cfg.image_size, flip=cfg.flip, batch_size=batch_size, workers=cfg.workers, device=device, seed=seed,
        **ranks,
    )
    val = FolderEvalSet([train_samples[r] for r in val_rows], **evaluation) if len(val_rows) else None
    return Data(info, train, val, FolderEvalSet(test_samples, **evaluation))


def _info(cfg, num_classes: int, shape: tuple[int, int, int], n_train: int, n_val: int, n_test: int) -> DatasetInfo:
    mean, std = tuple(float(v) for v in cfg.mean), tuple(float(v) for v in cfg.std)
    for key, values in (("mean", mean), ("std", std)):
        if len(values) not in (1, shape[0]):
            raise DataError(f"dataset.{key} has {len(values)} values but {cfg.name} images have {shape[0]} channels "
                            "(give one value per channel, or one for all)")
    # One value stands for every channel.
    mean, std = (mean * shape[0] if len(mean) == 1 else mean), (std * shape[0] if len(std) == 1 else std)
    return DatasetInfo(cfg.name, num_classes, shape, mean, std, n_train, n_val, n_test,
                       int(cfg.get("crop_padding") or 0))
