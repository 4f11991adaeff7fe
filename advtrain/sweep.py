"""Sweeps: stable sweep folders, and one GPU per job when jobs run in parallel on one machine.

    advtrain -m method=natural,pgd seed=0,1 dataset=synthetic
        # -> multirun/natural-pgd__seed0-1__synthetic-22a4660a/<job>/
    advtrain -m hydra/launcher=parallel method=pgd,trades seed=0,1,2   # joblib: one job per visible GPU at a time

Sweeps. A sweep's folder is named after its command-line overrides (`hydra.sweep.dir` is
`multirun/${advtrain_sweep_name:${hydra.overrides.task}}`), so rerunning the same command, with or without
`resume=auto`, finds the same folders. The name reads the swept overrides, then the fixed ones (config groups by
their choice, `method=pgd,trades` -> `pgd-trades`; other keys by their last part and value, `seed=0,1` -> `seed0-1`),
cut to 40 characters, then a hash of the full list so two sweeps never share a folder. It holds no `=` or `,`, so it
can be passed back in an override (`checkpoint=multirun/<name>/...`) without quotes. Hydra's own overrides
(`hydra/launcher=...`, `hydra.launcher.*`) and `resume` are left out: the same sweep sent through another launcher,
or resumed, lands in the same place. `hydra.sweep.dir=...` still picks any folder.
Under the joblib launcher each job claims a GPU of its own through a file lock in `<sweep dir>/.gpu_locks/`
(waiting while all are taken); without GPUs the jobs split the CPU cores (`cpu_threads_per_job`).
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from omegaconf import OmegaConf

log = logging.getLogger(__name__)

READABLE_CHARS = 40  # of a sweep folder's name, before its hash: enough to tell sweeps apart in a listing
CONF = Path(__file__).parent / "conf"
JOBLIB_LAUNCHER = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
CPU_PARALLEL_JOBS = 2  # joblib's default job count without a GPU: more only splits the same cores finer


def sweep_name(overrides: Sequence[str]) -> str:
    """A stable, file-name-safe folder name for a sweep's command-line overrides, e.g.
    'pgd-fgsm_rs__seed0-1__cifar10-4f1c2a9e': swept overrides first, then the fixed ones, config groups first."""
    kept = sorted((fixed, not _is_group(line), line) for fixed, line in _task_overrides(overrides))
    if not kept:
        return "default"
    readable = _first_words([_word(line) for *_, line in kept]).lstrip("._-")
    # The hash covers the full list: shortening and sanitizing make different sweeps read alike.
    digest = hashlib.sha1("\n".join(sorted(line for *_, line in kept)).encode()).hexdigest()[:8]
    return f"{readable}-{digest}" if readable else digest


def _key_and_value(line: str) -> tuple[str, str]:
    key, _, value = line.partition("=")
    return key.lstrip("+~").split("@")[0], value


def _is_group(line: str) -> bool:
    key = _key_and_value(line)[0]
    return bool(key) and (CONF / key).is_dir()


def _word(line: str) -> str:
    """An override as a few file-name-safe characters: a group by its choice, any other key by its last part."""
    key, value = _key_and_value(line)
    value = re.sub(r"[\[\]{}()'\"\s]", "", value).replace(",", "-")  # list and quote syntax adds nothing
    word = value if _is_group(line) else key.rsplit(".", 1)[-1] + value
    return re.sub(r"[^A-Za-z0-9._-]+", "_", word).strip("_")


def _first_words(words: list[str]) -> str:
    """As many whole words as fit in READABLE_CHARS (at least part of the first), joined by '__'."""
    words = [w for w in words if w] or [""]  # attack=[] reads as nothing
    name = words[0][:READABLE_CHARS]
    for word in words[1:]:
        if len(name) + 2 + len(word) > READABLE_CHARS:
            break
        name += "__" + word
    return name.rstrip("._-")


def _task_overrides(overrides: Sequence[str]) -> list[tuple[bool, str]]:
    """(is fixed, override) for each override that names the sweep: not Hydra's own (launcher, sweep dir, ...),
    and not `resume`, since a sweep rerun with resume=auto must find the folders of its first run."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    lines = [o.strip() for o in overrides if o.strip()]
    try:
        parsed = OverridesParser.create().parse_overrides(lines)
    except OverrideParseException:  # Hydra has parsed them before us; this keeps a name for any input
        return [(True, line) for line in lines if not line.lstrip("+~").startswith(("hydra.", "hydra/", "resume="))]
    return [(not o.is_sweep_override(), line) for o, line in zip(parsed, lines)
            if not o.is_hydra_override() and o.key_or_group != "resume"]


def parallel_jobs() -> int:
    """Jobs the joblib launcher runs at once: one per visible GPU, or a couple that share the CPU."""
    return visible_gpus() or CPU_PARALLEL_JOBS


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def register_resolvers() -> None:
    """The resolvers advtrain's config uses; safe to call more than once."""
    if not OmegaConf.has_resolver("advtrain_sweep_name"):
        # Cached like Hydra's ${now:}: Hydra copies the multirun's resolver cache into each job's config, where
        # hydra.overrides.task holds only that job's overrides; the cache keeps the sweep's name there.
        OmegaConf.register_new_resolver("advtrain_sweep_name", lambda overrides: sweep_name(list(overrides)),
                                        use_cache=True)
    if not OmegaConf.has_resolver("advtrain_parallel_jobs"):
        OmegaConf.register_new_resolver("advtrain_parallel_jobs", parallel_jobs)
    if not OmegaConf.has_resolver("advtrain_options"):  # advtrain-eval's --help: the one group it takes
        OmegaConf.register_new_resolver("advtrain_options", group_options)


def group_options(group: str) -> str:
    """The options of a config group, as `advtrain --help` lists them: 'a, b, c'."""
    folder = Path(__file__).parent / "conf" / group
    return ", ".join(sorted(p.stem for p in folder.glob("*.yaml")))


def _joblib_config():
    """The Hydra config of the current job when the joblib launcher runs it, else None."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    return hydra_cfg if OmegaConf.select(hydra_cfg, "launcher._target_") == JOBLIB_LAUNCHER else None


def cpu_threads_per_job() -> int | None:
    """CPU threads each joblib job may use so parallel jobs do not oversubscribe the cores; None otherwise."""
    hydra_cfg = _joblib_config()
    if hydra_cfg is None:
        return None
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    n_jobs = int(hydra_cfg.launcher.n_jobs)
    if n_jobs < 0:  # joblib's convention: -1 is every CPU, -2 all but one, ...
        n_jobs = max(1, cpus + 1 + n_jobs)
    return max(1, cpus // n_jobs)


@contextmanager
def claim_device(poll_s: float = 5.0) -> Iterator[int | None]:
    """The CUDA device index this job has to itself, held until the block exits; None when the job is not a
    joblib job or at most one GPU is visible (then there is nothing to share out)."""
    hydra_cfg = _joblib_config()
    count = visible_gpus() if hydra_cfg is not None else 0
    if count <= 1:
        yield None
        return
    with claim_gpu(Path(hydra_cfg.sweep.dir) / ".gpu_locks", count, poll_s) as index:
        yield index


@contextmanager
def claim_gpu(lock_dir: Path, count: int, poll_s: float = 5.0) -> Iterator[int]:
    """Hold `lock_dir/gpu<k>.lock` for the first free k in 0..count-1, waiting while all are held.

    flock locks belong to the open file, so the kernel drops them when a job dies, and two claims conflict even
    within one process. joblib reuses its worker processes for later jobs, so the lock is released on exit.
    """
    lock_dir.mkdir(parents=True, exist_ok=True)
    warned = False
    while True:
        for index in range(count):
            fd = os.open(lock_dir / f"gpu{index}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            try:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())  # who holds it, for a person looking at the folder
                yield index
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
            return
        if not warned:
            warned = True
            log.info("all %d GPUs are taken by other jobs of this sweep; waiting for one", count)
        time.sleep(poll_s)
