"""One process at a time in a run directory: an exclusive flock on `<run dir>/.lock`.

Two commands on one `hydra.run.dir`, or a sweep rerun while it still runs, would otherwise train the same run twice
at once and write one checkpoint over the other. The kernel releases the lock when its holder dies, however it dies,
so a lock never outlives a crash, a kill -9 or a preemption. The holder's pid is written into the file for the
message the next process shows. Filesystems without flock (some NFS and Lustre mounts) get a warning and no lock.
"""
from __future__ import annotations

import errno
import os
import shutil
import stat
import warnings
from contextlib import contextmanager
from pathlib import Path

from advtrain.engine.atomic import atomic_write
from advtrain.errors import ConfigError

try:
    import fcntl
except ImportError:  # not POSIX: no lock
    fcntl = None

LOCK_NAME = ".lock"
HYDRA_RECORD = ".hydra"  # Hydra's usual folder for its record of the job


class RunDirBusy(ConfigError):
    """Another live process holds this run directory."""

    def __init__(self, run_dir: Path, pid: int | None):
        self.run_dir, self.pid = run_dir, pid
        holder = f"pid {pid}" if pid else "another process"
        super().__init__(f"{run_dir} is in use by {holder} (another advtrain is training in this run directory; "
                         "wait for it, stop it, or choose another hydra.run.dir)")


def _holder(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


def _open_lock(path: Path) -> int:
    """The lock file, opened for writing without following a link: on a group-writable folder anyone in the group
    could plant `.lock` as a link to a file of ours, which the pid written below would overwrite."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as e:
        if e.errno not in (errno.ELOOP, errno.EISDIR):
            raise
        fd = None
    info = os.fstat(fd) if fd is not None else None
    if info is None or not stat.S_ISREG(info.st_mode) or info.st_nlink > 1:
        if fd is not None:
            os.close(fd)
        what = "a symbolic link" if path.is_symlink() else "a hard link" if info and info.st_nlink > 1 else \
            "not a regular file"
        raise ConfigError(f"{path} is {what}; advtrain's run lock is a plain file it writes its pid into, and it "
                          "will not write through a link: remove it (someone may have planted it) and rerun")
    return fd


@contextmanager
def exclusive(run_dir: Path):
    """Hold `run_dir` for the duration; raises RunDirBusy at once if another process holds it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    fd = _open_lock(run_dir / LOCK_NAME)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirBusy(run_dir, _holder(fd)) from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            warnings.warn(f"{run_dir}: this filesystem does not support locks; two commands on this run directory "
                          "would not be stopped from training at once")
        else:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def is_held_elsewhere(run_dir: Path) -> bool:
    """Whether another process holds `run_dir` now (to leave its folder alone)."""
    path = run_dir / LOCK_NAME
    if fcntl is None or not path.is_file() or path.is_symlink():
        return False
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def discard_if_fresh(run_dir: Path, hydra_files: set[str]) -> None:
    """Remove a run folder that holds nothing but Hydra's own files (and a released lock): a run that failed before
    writing anything leaves no folder behind, nor the empty dated folders Hydra made above it inside the working
    directory. A folder another process holds is never touched."""
    if not run_dir.is_dir() or is_held_elsewhere(run_dir):
        return
    if not {p.name for p in run_dir.iterdir()} <= hydra_files | {LOCK_NAME}:
        return
    shutil.rmtree(run_dir)
    cwd = Path.cwd().resolve()
    parent = run_dir.resolve().parent
    while parent != cwd and cwd in parent.parents and not any(parent.iterdir()):
        parent.rmdir()
        parent = parent.parent


def record_hydra_config(run_dir: Path, task_cfg) -> None:
    """Hydra's record of the job (.hydra/config.yaml, hydra.yaml, overrides.yaml), written by the process that holds
    `run_dir`: Hydra itself would write it before the job starts (hydra.output_subdir is null in our configs), over
    the record of a run that another process holds."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    hydra_cfg = HydraConfig.instance().cfg
    for name, cfg in (("config.yaml", task_cfg), ("hydra.yaml", hydra_cfg),
                      ("overrides.yaml", hydra_cfg.hydra.overrides.task)):
        text = OmegaConf.to_yaml(cfg).encode()
        atomic_write(run_dir / HYDRA_RECORD / name, lambda f: f.write(text))


def discard_fresh_run_dir() -> None:
    """Remove this Hydra job's run folder if only Hydra's own files are in it (a run that failed before writing
    anything, or a torchrun/srun rank that adopted rank 0's folder)."""
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    discard_if_fresh(Path(hydra_cfg.runtime.output_dir), {HYDRA_RECORD, f"{hydra_cfg.job.name}.log"})
