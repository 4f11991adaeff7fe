"""SVHN (cropped digits) from the official .mat files: <root>/train_32x32.mat and <root>/test_32x32.mat.

scipy reads the .mat files and is an optional dependency (pip install advtrain[svhn]), so it is imported only here.
"""

from pathlib import Path

import numpy as np
from torchvision.datasets import SVHN

from .errors import DataError
from .files import check_md5, download_file, fetch, missing_files


def _loadmat():
    try:
        from scipy.io import loadmat
    except ImportError as e:
        raise DataError("reading SVHN needs scipy: pip install advtrain[svhn]") from e
    return loadmat


def read_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One split -> images (N,3,32,32) uint8 and labels (N,) int64 with digit 0 as label 0."""
    loadmat = _loadmat()
    try:
        mat = loadmat(path, variable_names=("X", "y"))
    except Exception as e:  # scipy raises many types for damaged files; all mean the same here
        raise DataError(f"{path}: cannot read the .mat file ({type(e).__name__}: {e})") from e
    images, labels = mat.get("X"), mat.get("y")
    if images is None or images.dtype != np.uint8 or images.ndim != 4 or images.shape[:3] != (32, 32, 3):
        raise DataError(f"{path}: 'X' is not a (32,32,3,N) uint8 array")
    if labels is None or labels.size != images.shape[3]:
        raise DataError(f"{path}: 'y' does not hold one label per image")
    labels = labels.reshape(-1).astype(np.int64)
    if labels.min(initial=1) < 1 or labels.max(initial=1) > 10:
        raise DataError(f"{path}: labels outside 1..10")
    labels[labels == 10] = 0  # SVHN writes the digit 0 as class 10
    # The file stores (H,W,C,N); the training code wants (N,C,H,W).
    return np.ascontiguousarray(images.transpose(3, 2, 0, 1)), labels


def read_svhn(root: Path, *, download: bool, check: bool) -> tuple[np.ndarray, ...]:
    """(train_x (N,3,32,32) uint8, train_y int64, test_x, test_y); the 'extra' split is not used."""
    _loadmat()  # fail before a 180 MB download that could not be read
    splits = [SVHN.split_list[split] for split in ("train", "test")]  # [url, filename, md5]
    source = splits[0][0].rsplit("/", 1)[0] + "/"
    by_hand = f"download {', '.join(name for _, name, _ in splits)} by hand from {source} into {root.resolve()}"
    for url, filename, md5 in splits:
        if download and not (root / filename).is_file():
            fetch("svhn", [url], lambda url: download_file(url, root, filename, md5), by_hand,
                  writes=[root / filename])
    missing = [filename for _, filename, _ in splits if not (root / filename).is_file()]
    if missing:
        raise missing_files("svhn", root, missing, by_hand)
    arrays = []
    for _, filename, md5 in splits:
        if check:
            check_md5(root / filename, md5)
        arrays += read_mat(root / filename)
    return tuple(arrays)
