"""Finding, checking and downloading the official dataset files.

Downloads go through torchvision.datasets.utils, which also checks the archive's md5. Before one starts, the hosts
are probed under one short deadline: offline, a resolver or a route that never answers would otherwise hold the run
for tens of seconds per mirror. Without network access the DataError says where to get the files by hand, the
absolute folder they go in, the exact names expected there, and that dataset.root can point at a folder that already
holds them. A failed attempt takes back the files and folders it made, so it leaves no empty dataset tree behind.
"""

import hashlib
import os
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from urllib.parse import urlsplit

from torchvision.datasets import utils as tv_utils

from .errors import DataError

# Online, a resolver and a TCP handshake answer in well under a second; offline, glibc waits 5 s per try for a
# silent nameserver and TCP over a minute for a dropped route, so a host silent this long is taken for unreachable.
PROBE_SECONDS = 3.0


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
        f"{dataset} files not found: expected {', '.join(names)} in {folder.resolve()}; set dataset.download=true "
        f"(needs internet access), or {by_hand}, or point dataset.root=... at the folder that already holds them"
    )


def fetch(dataset: str, sources: list[str], download: Callable[[str], None], by_hand: str, *,
          writes: Iterable[Path]) -> None:
    """download(source) from the first of `sources` (mirrors, in order of preference) whose host answers and whose
    download works. `writes`: the files and folders the download makes; if it fails, those it newly made go again."""
    with _undone_on_failure(writes):
        probes = _probe(sources)
        failures, cause = [], None
        for source in sources:
            unreachable = probes[_host_key(source)].wait()
            if unreachable:
                failures.append(unreachable)
                continue
            try:
                return download(source)
            except (OSError, RuntimeError, ValueError) as e:  # URLError is an OSError; a bad md5 a RuntimeError
                failures.append(f"{type(e).__name__}: {e}")
                cause = e
        raise DataError(
            f"could not download {dataset} ({'; '.join(dict.fromkeys(failures))}); without network access, "
            f"{by_hand}, or point dataset.root=... at the folder that already holds the files"
        ) from cause


def download_archive(url: str, folder: Path, filename: str, md5: str) -> None:
    tv_utils.download_and_extract_archive(url, download_root=str(folder), filename=filename, md5=md5)


def download_file(url: str, folder: Path, filename: str, md5: str) -> None:
    tv_utils.download_url(url, root=str(folder), filename=filename, md5=md5)


class _Probe(threading.Thread):
    """One TCP connection to the host that downloading `url` talks to (the proxy, where urllib would use one)."""

    def __init__(self, url: str, deadline: float):
        # daemon: a resolver that never answers must not keep the process alive once the run has given up on it
        super().__init__(daemon=True)
        self.address, self.deadline = _address(url), deadline
        host, port, via = self.address
        self.label = f"{via}{host}:{port}"
        self.why = f"{self.label}: no answer within {PROBE_SECONDS:g} s"  # until the connection says otherwise
        self.start()

    def run(self) -> None:
        host, port, _ = self.address
        try:
            socket.create_connection((host, port), timeout=PROBE_SECONDS).close()
            self.why = None
        except TimeoutError:
            pass  # self.why says so already
        except OSError as e:  # gaierror (name unknown, no resolver), refused, unreachable network
            self.why = f"{self.label}: {e.strerror or e}"

    def wait(self) -> str | None:
        """None once the host has answered; else why it has not, by the deadline at the latest."""
        self.join(max(0.0, self.deadline - time.monotonic()))
        return self.why


def _probe(urls: list[str]) -> dict[tuple[str, str], _Probe]:
    """One probe per host, all started at once: an offline machine costs one deadline, however many mirrors."""
    deadline = time.monotonic() + PROBE_SECONDS
    keys = dict.fromkeys(_host_key(url) for url in urls)
    return {key: _Probe(f"{key[0]}://{key[1]}/", deadline) for key in keys}


def _host_key(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc


def _address(url: str) -> tuple[str, int, str]:
    """(host, port, "proxy " or "") that urllib connects to for `url`, with the proxies of the environment."""
    parts = urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    via = ""
    if proxy and not urllib.request.proxy_bypass(parts.hostname):
        parts, via = urlsplit(proxy if "://" in proxy else f"http://{proxy}"), "proxy "
    try:
        return parts.hostname, parts.port or (443 if parts.scheme == "https" else 80), via
    except ValueError as e:  # only a proxy from the environment can carry a port that is no number
        raise DataError(f"the proxy {proxy} set in the environment for {url} is not a valid URL ({e})") from e


@contextmanager
def _undone_on_failure(paths: Iterable[Path]) -> Iterator[None]:
    """If the block fails (Ctrl-C included), remove those of `paths` it created and the folders made to hold them.
    A folder goes only while empty: one that existed before, or holds anything, stays as it is."""
    paths = [Path(p).absolute() for p in paths]
    new = [p for p in paths if not os.path.lexists(p)]
    made = {folder for p in paths for folder in p.parents if not os.path.lexists(folder)}
    try:
        yield
    except BaseException:
        for path in new:
            if path.is_symlink() or path.is_file():  # a partial or corrupt download of this attempt
                path.unlink(missing_ok=True)
        for folder in sorted({*new, *made}, key=lambda p: len(p.parts), reverse=True):  # deepest first
            with suppress(OSError):  # not empty, or not a folder: keep it
                folder.rmdir()
        raise
