"""Files a run writes, written atomically: a temporary file in the same folder, fsynced, renamed over the target,
then the folder fsynced, so a crash, a kill or a full disk leaves either the old file or the new one, never half of
one. The file gets the permissions the user's umask gives any new file (mkstemp alone would make it 0600, unreadable
for the group on a shared cluster)."""
from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

TEMP_SUFFIX = ".tmp"
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _file_mode() -> int:
    mask = os.umask(0o022)  # the only way to read the umask is to set it; put it straight back
    os.umask(mask)
    return 0o666 & ~mask


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (the folder's entry), where the platform allows opening a folder."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a folder; the rename is still atomic
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """write(f) fills a temporary file that then replaces `path`; on any failure the temporary file is removed and
    `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), _file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def is_disk_full(e: BaseException | None) -> bool:
    """Whether a full disk (or quota) is behind this error. torch.save reports a failed write as a RuntimeError
    whose context holds the OSError, so the whole chain is searched."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError) and e.errno in DISK_FULL:
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def remove_stale_temps(*folders: Path) -> list[Path]:
    """Temporary files of writes that a kill interrupted (`.<name>.*.tmp`). Call only while no other process writes
    into these folders (the run directory's lock is held)."""
    removed = []
    for folder in folders:
        for tmp in folder.glob(f".*{TEMP_SUFFIX}") if folder.is_dir() else ():
            if tmp.is_file():
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
    return removed
