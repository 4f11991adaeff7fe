"""MNIST and Fashion-MNIST from their official IDX files, parsed here (raw files, or the .gz when only it is there).

Layout (torchvision's): <root>/MNIST/raw/*-ubyte[.gz] and <root>/FashionMNIST/raw/*-ubyte[.gz].
"""

import gzip
import struct
from pathlib import Path

import numpy as np
from torchvision.datasets import MNIST, FashionMNIST

from .errors import DataError
from .files import check_md5, download_archive, fetch, missing_files

_FOLDERS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}
_TORCHVISION = {"mnist": MNIST, "fashion_mnist": FashionMNIST}
_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
# torchvision lists only the .gz md5s; these are of the official files after gzip -d (shared/data/README.md).
_RAW_MD5 = {
    "mnist": {
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
        "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
        "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
    },
}
_UBYTE = 0x08  # IDX type code of unsigned bytes, the only one the official files use


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes with `ndim` dimensions, checked against its own header."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            buf = f.read()
    except (OSError, EOFError) as e:  # a truncated .gz raises EOFError, a damaged one BadGzipFile (an OSError)
        raise DataError(f"{path}: cannot read ({e})") from e
    if len(buf) < 4 or buf[:2] != b"\0\0" or buf[2] != _UBYTE or buf[3] != ndim:
        raise DataError(f"{path}: bad header (not an IDX file of unsigned bytes with {ndim} dimensions)")
    start = 4 + 4 * ndim
    if len(buf) < start:
        raise DataError(f"{path}: truncated inside the header")
    dims = struct.unpack(f">{ndim}I", buf[4:start])
    expected = int(np.prod(dims))
    if len(buf) - start != expected:
        raise DataError(
            f"{path}: truncated or padded: header {dims} needs {expected} bytes of data, found {len(buf) - start}"
        )
    return np.frombuffer(buf, np.uint8, offset=start).reshape(dims).copy()  # copy: frombuffer of bytes is read-only


def read_mnist(name: str, root: Path, *, download: bool, check: bool) -> tuple[np.ndarray, ...]:
    """(train_x (N,1,28,28) uint8, train_y int64, test_x, test_y) for name in {mnist, fashion_mnist}."""
    folder = root / _FOLDERS[name] / "raw"
    tv = _TORCHVISION[name]
    gz_md5 = {filename.removesuffix(".gz"): md5 for filename, md5 in tv.resources}
    source = tv.mirrors[0]

    def locate() -> dict[str, Path | None]:
        return {
            stem: next((p for p in (folder / stem, folder / f"{stem}.gz") if p.is_file()), None) for stem in _STEMS
        }

    paths = locate()
    missing = [stem for stem, path in paths.items() if path is None]
    by_hand = (f"download {', '.join(f'{stem}.gz' for stem in _STEMS)} by hand from {source} into "
               f"{folder.resolve()} (gzipped or not)")
    if missing and download:
        for stem in missing:
            gz = f"{stem}.gz"
            fetch(name, tv.mirrors, lambda mirror: download_archive(f"{mirror}{gz}", folder, gz, gz_md5[stem]),
                  by_hand, writes=[folder / gz, folder / stem])
        paths = locate()
        missing = [stem for stem, path in paths.items() if path is None]
    if missing:
        raise missing_files(name, folder, [f"{stem}[.gz]" for stem in missing], by_hand)
    if check:
        for stem, path in paths.items():
            check_md5(path, gz_md5[stem] if path.suffix == ".gz" else _RAW_MD5[name][stem])

    arrays = []
    for split in ("train", "t10k"):
        images_path, labels_path = paths[f"{split}-images-idx3-ubyte"], paths[f"{split}-labels-idx1-ubyte"]
        images, labels = read_idx(images_path, 3), read_idx(labels_path, 1)
        if images.shape[1:] != (28, 28):
            raise DataError(f"{images_path}: images are {images.shape[1:]}, expected 28x28")
        if len(images) != len(labels):
            raise DataError(f"{labels_path}: {len(labels)} labels for the {len(images)} images in {images_path.name}")
        if labels.max(initial=0) > 9:
            raise DataError(f"{labels_path}: labels outside 0..9")
        arrays += [images[:, None], labels.astype(np.int64)]
    return tuple(arrays)
