"""CIFAR-10 and CIFAR-100 from the official python pickles, read with a restricted unpickler.

A pickle can name any importable callable and have it run while loading, so a doctored file could run code. The
unpickler here admits only what the official files contain: dicts, lists, strings, ints and numpy arrays (rebuilt
through numpy's own _reconstruct/ndarray/dtype). Anything else is refused before it is called.

Layout (torchvision's): <root>/cifar-10-batches-py/{data_batch_1..5,test_batch}, <root>/cifar-100-python/{train,test}.
"""

import pickle
from pathlib import Path

import numpy as np
from torchvision.datasets import CIFAR10, CIFAR100

from .errors import DataError
from .files import check_md5, download_archive, fetch, missing_files

# The official files were written by Python 2 numpy (module numpy.core.multiarray); files written by numpy 2 name
# numpy._core. Both names map to the callable this numpy actually has, found without touching deprecated modules.
_RECONSTRUCT = np.ndarray.__reduce__(np.empty(0))[0]
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}
_VARIANTS = {  # name -> (torchvision class, label key, number of classes)
    "cifar10": (CIFAR10, "labels", 10),
    "cifar100": (CIFAR100, "fine_labels", 100),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused {module}.{name}, which the official files do not contain") from None


def read_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch -> images (N,3,32,32) uint8 and labels (N,) int64."""
    try:
        with open(path, "rb") as f:
            # latin1 turns Python 2 strings into str and leaves numpy's raw array bytes intact (as torchvision does).
            batch = _RestrictedUnpickler(f, encoding="latin1").load()
    except Exception as e:  # any failure to parse means a corrupt file; nothing unsafe ran
        raise DataError(f"{path}: cannot unpickle ({type(e).__name__}: {e})") from e
    if not isinstance(batch, dict):
        raise DataError(f"{path}: expected a pickled dict, found {type(batch).__name__}")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    data, labels = batch.get("data"), batch.get(label_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: 'data' is not an (N,3072) uint8 array")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}: '{label_key}' is not a list of ints") from e
    if labels.shape != (len(data),):
        raise DataError(f"{path}: {labels.size} '{label_key}' for {len(data)} images")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path}: '{label_key}' outside 0..{num_classes - 1}")
    # Each row holds the red, then green, then blue 32x32 plane, row-major: that is already (C,H,W).
    return data.reshape(-1, 3, 32, 32), labels


def read_cifar(name: str, root: Path, *, download: bool, check: bool) -> tuple[np.ndarray, ...]:
    """(train_x (N,3,32,32) uint8, train_y int64, test_x, test_y) for name in {cifar10, cifar100}."""
    tv, label_key, num_classes = _VARIANTS[name]
    folder = root / tv.base_folder
    files = {
        "train": [(folder / filename, md5) for filename, md5 in tv.train_list],
        "test": [(folder / filename, md5) for filename, md5 in tv.test_list],
    }
    every = files["train"] + files["test"]
    by_hand = (f"download {tv.filename} by hand from {tv.url} and extract it in {root.resolve()} (the archive holds "
               f"the folder {tv.base_folder}/ with {', '.join(path.name for path, _ in every)})")
    if download and not all(path.is_file() for path, _ in every):
        fetch(name, [tv.url], lambda url: download_archive(url, root, tv.filename, tv.tgz_md5), by_hand,
              writes=[root / tv.filename, folder])
    missing = [path.name for path, _ in every if not path.is_file()]
    if missing:
        raise missing_files(name, folder, missing, by_hand)
    arrays = []
    for split in ("train", "test"):
        if check:
            for path, md5 in files[split]:
                check_md5(path, md5)
        batches = [read_batch(path, label_key, num_classes) for path, _ in files[split]]
        arrays += [np.concatenate([x for x, _ in batches]), np.concatenate([y for _, y in batches])]
    return tuple(arrays)
