"""Finding, checking and downloading the official dataset files.

Downloads go through torchvision.datasets.utils, which also checks the archive's md5. Without network access the
DataError says where to get the files by hand, the absolute folder they go in, the exact names expected there, and
that dataset.root can point at a folder that already holds them.
"""

import hashlib
from collections.abc import Callable, Iterable
from pathlib import Path

from torchvision.datasets import utils as tv_utils

from .errors import DataError


def md5sum(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):  # 1 MiB reads keep memory flat for the 180 MB SVHN file
            digest.update(chunk)
    return digest.hexdigest()


def check_md5(path: Path, expected: str) -> None:
    actual = md5sum(path)
    if actual != expected:
        raise DataError(
            f"{path}: md5 {actual} differs from the official {expected}; the file is corrupt or not the official "
            "one (delete it and download it again, or set dataset.check_md5=false for files you made yourself)"
        )


def missing_files(dataset: str, folder: Path, names: Iterable[str], by_hand: str) -> DataError:
    """`by_hand`: how to get the files without advtrain's download, e.g. "download X from URL and extract it in F"."""
    return DataError(
        f"{dataset} files not found: expected {', '.join(names)} in {folder.resolve()}; set dataset.download=true, "
        f"or {by_hand}, or point dataset.root=... at the folder that already holds them"
    )


def fetch(dataset: str, download: Callable[[], None], by_hand: str) -> None:
    try:
        download()
    except (OSError, RuntimeError, ValueError) as e:  # URLError is an OSError; a bad archive md5 a RuntimeError
        raise DataError(
            f"could not download {dataset} ({type(e).__name__}: {e}); without network access, {by_hand}, or point "
            "dataset.root=... at the folder that already holds the files"
        ) from e


def download_archive(url: str, folder: Path, filename: str, md5: str) -> None:
    tv_utils.download_and_extract_archive(url, download_root=str(folder), filename=filename, md5=md5)


def download_file(url: str, folder: Path, filename: str, md5: str) -> None:
    tv_utils.download_url(url, root=str(folder), filename=filename, md5=md5)
