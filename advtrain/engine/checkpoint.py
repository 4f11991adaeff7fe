"""Checkpoints, in one place: what a checkpoint holds (`Checkpoint`), how it is written, verified and read, and a
run's policy around them (`RunCheckpoints`: what it resumes from, what it writes and keeps).

A checkpoint is a plain dict of tensors, numbers, strings and containers, read with weights_only=True, so a
checkpoint never executes code. The resolved config travels as YAML text, never as a pickled object, so checkpoints
keep loading after library upgrades. Each file is written atomically (advtrain.engine.atomic) and carries a SHA-256
digest of its contents, checked on every load: a disk or a copy that changed a bit is named, never trained on.
Format 1 files (written before digests) still load, unchecked.

A run keeps `last.pt` (every checkpoint, mid-epoch ones included), `best.pt` (model selection on the validation
split) and the newest `trainer.keep_checkpoints` epoch checkpoints (`epoch_0007.pt`: hard links to the last.pt of
that epoch, so they cost no disk space until last.pt moves on). A damaged last.pt under resume=auto falls back to the
newest epoch checkpoint that verifies.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from advtrain.engine.atomic import TEMP_SUFFIX, atomic_write, is_disk_full, remove_stale_temps
from advtrain.engine.distributed import Dist, sync_buffers, to_cpu
from advtrain.engine.loop import LoopState
from advtrain.engine.precision import rng_state, set_rng_state
from advtrain.engine.results import eval_settings
from advtrain.errors import CheckpointError
from advtrain.methods import method_defaults
from advtrain.schema import trajectory_keys

FORMAT = 2          # 2: with "digest"; bump when the layout of the record changes
READABLE = (1, 2)   # 1: no digest
EPOCH_FILE = re.compile(r"epoch_(\d+)\.pt")


# --- the record -------------------------------------------------------------------------------------------------
@dataclass
class Checkpoint:
    """What a checkpoint holds. The first four fields are what rebuilding and evaluating a model needs; the rest is
    the training state a resumed run continues from."""
    model: dict                       # the network's state_dict
    config: str                       # the resolved config, YAML text
    model_spec: dict                  # what rebuilds the network without config files (engine.network)
    loop: dict                        # LoopState's fields: where training stands
    optimizer: dict | None = None
    scaler: dict | None = None        # fp16's loss scaler
    method: dict = field(default_factory=dict)    # rank 0's method state (FREE's delta, DEAT's schedule, ...)
    loader: dict = field(default_factory=dict)    # the data order
    rng: dict | None = None
    counter: dict = field(default_factory=lambda: {"total": 0})  # forward+backward passes, summed over ranks
    updates: int = 0
    world_size: int = 1
    ranks: list | None = None         # with several ranks: each rank's method, rng and counter
    companions: dict = field(default_factory=dict)  # name -> checkpoint path of a frozen model the method read

    REQUIRED = ("model", "config", "model_spec", "loop")

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def load(cls, path: str | Path, map_location: Any = "cpu") -> "Checkpoint":
        """The verified record in `path`; one CheckpointError line naming the file for anything else."""
        state = load_checkpoint(path, map_location)
        missing = [k for k in cls.REQUIRED if state.get(k) is None]
        if missing:
            raise CheckpointError(f"checkpoint {path} is incomplete: it lacks {', '.join(map(repr, missing))} "
                                  "(it was not written by advtrain's training)")
        wrong = [k for k, kind in (("model", dict), ("config", str), ("model_spec", dict), ("loop", dict))
                 if not isinstance(state[k], kind)]
        if wrong or not {"epoch", "batch"} <= set(state["loop"]):
            raise CheckpointError(f"checkpoint {path} is malformed: {', '.join(map(repr, wrong)) or repr('loop')} "
                                  "does not hold what advtrain writes there")
        known = {f.name for f in fields(cls)}
        record = cls(**{k: v for k, v in state.items() if k in known})
        record.source = Path(path)  # for messages; not part of the record
        return record

    @property
    def finished(self) -> bool:
        return bool(self.loop.get("finished"))

    def describe(self, path: Path) -> str:
        loop = self.loop
        where = f"epoch {loop['epoch'] + 1}, batch {loop['batch']}" if loop.get("batch") else \
            f"after epoch {loop['epoch']}"
        return f"{path} ({'finished' if self.finished else where})"


# --- the file ---------------------------------------------------------------------------------------------------
def content_digest(state: dict) -> str:
    """SHA-256 of a checkpoint's contents (every key but "digest"): each tensor's dtype, shape and bytes, every
    other value's type and repr, in the dict's order (which torch.save keeps)."""
    h = hashlib.sha256()

    def feed(obj) -> None:
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous().reshape(-1)  # 1-d: a 0-d tensor cannot be viewed as bytes
            h.update(f"T{t.dtype}{tuple(obj.shape)}".encode())
            h.update(memoryview(t.view(torch.uint8).numpy()))
        elif isinstance(obj, dict):
            h.update(f"D{len(obj)}".encode())
            for k, v in obj.items():
                feed(k)
                feed(v)
        elif isinstance(obj, (list, tuple)):
            h.update(f"{type(obj).__name__[0]}{len(obj)}".encode())
            for v in obj:
                feed(v)
        else:
            h.update(f"{type(obj).__name__}:{obj!r};".encode())

    feed({k: v for k, v in state.items() if k != "digest"})
    return h.hexdigest()


def save_checkpoint(state: dict | Checkpoint, path: str | Path) -> None:
    """Atomic (advtrain.engine.atomic): a crash, a kill or a full disk leaves the previous checkpoint intact."""
    body = state.to_dict() if isinstance(state, Checkpoint) else state
    body = {"format": FORMAT, **{k: v for k, v in body.items() if k not in ("format", "digest")}}
    body["digest"] = content_digest(body)
    atomic_write(path, lambda f: torch.save(body, f))


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """The checkpoint's dict, read with weights_only=True and checked against its digest."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for truncated, foreign or code-carrying files
        raise CheckpointError(f"checkpoint {path} {_unreadable(e)}") from None
    if not isinstance(state, dict) or state.get("format") not in READABLE or "model" not in state:
        raise CheckpointError(f"checkpoint {path} is not an advtrain checkpoint of format {FORMAT}")
    if state["format"] >= 2 and state.get("digest") != content_digest(state):
        raise CheckpointError(f"checkpoint {path} is damaged: its contents do not match the digest written with it "
                              "(the file changed after it was saved: a disk or copy error)")
    return state


def _unreadable(e: Exception) -> str:
    """Why torch could not read a file, in a few words; a file that would run code names what it would call (and
    not torch's advice to load it with weights_only=False, which would run it)."""
    text = str(e)
    # torch's wording varies between releases: "Unsupported global: GLOBAL os.system", "unsupported GLOBAL posix.system"
    refused = re.search(r"GLOBAL ([\w.]+)", text)
    if "Weights only load failed" in text or refused:
        name = refused.group(1) if refused else "an object that is not plain data"
        return (f"is refused: loading it would call {name}, which no advtrain checkpoint holds (it cannot be read "
                "safely; a checkpoint never executes code)")
    reason = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return f"is corrupt or not an advtrain checkpoint (it cannot be read safely: {reason[:160]})"


# --- a run's checkpoints ----------------------------------------------------------------------------------------
class RunCheckpoints:
    """last.pt, best.pt and the epoch history of one run directory; what the run resumes from.

    Every rank takes part in a save (per-rank RNG, method state and pass counts are gathered to rank 0, which alone
    writes), and none moves on before the file is on disk. `bind` names the parts a save snapshots."""

    def __init__(self, run_dir: Path, dist: Dist, keep: int = 2):
        self.run_dir, self.dist, self.keep = run_dir, dist, keep
        self.folder = run_dir / "checkpoints"
        self.last_path = self.folder / "last.pt"
        self.best_path = self.folder / "best.pt"
        self.results_path = run_dir / "results.json"
        self.newest: str | None = None  # the newest checkpoint on disk, described: "<path> (after epoch 3)"
        self.resumed_from: Path | None = None
        self._parts = None

    def remove_stale(self) -> list[Path]:
        """Temporary files of writes a kill interrupted (the run directory is held: nothing else writes here)."""
        return remove_stale_temps(self.run_dir, self.folder) if self.dist.is_main else []

    def epoch_files(self) -> list[Path]:
        """The kept epoch checkpoints, newest first."""
        found = [(int(m.group(1)), p) for p in self.folder.glob("epoch_*.pt") if (m := EPOCH_FILE.fullmatch(p.name))]
        return [p for _, p in sorted(found, reverse=True)]

    # --- resuming ------------------------------------------------------------------------------------------------
    def resume_state(self, cfg, say=print) -> Checkpoint | None:
        """The checkpoint this run continues from (resume=auto|PATH), checked against the run, or None. Under
        resume=auto a damaged last.pt gives way to the newest epoch checkpoint that verifies, said in one line."""
        if cfg.resume in (None, "never"):
            return None
        if cfg.resume != "auto":
            path = Path(cfg.resume)
            return self._fits(Checkpoint.load(path), path, cfg)
        candidates = [p for p in (self.last_path, *self.epoch_files()) if p.exists()]
        damage = None
        for path in candidates:
            try:
                state = Checkpoint.load(path)
            except CheckpointError as e:
                damage = damage or e
                continue
            if damage is not None:
                say(f"warning: {damage}; continuing from {state.describe(path)}, the newest checkpoint that verifies")
            return self._fits(state, path, cfg)
        if damage is not None:
            raise CheckpointError(f"{damage}; no other checkpoint of this run verifies: to start this run over "
                                  "instead, rerun with resume=never (its checkpoints are then replaced)")
        return None

    def _fits(self, state: Checkpoint, path: Path, cfg) -> Checkpoint:
        if state.world_size != self.dist.world_size and not state.finished:
            # Each rank's RNG stream and method state (FREE's perturbations, ...) belong to its shard of the data.
            raise CheckpointError(f"cannot resume from {path}: it was written by {state.world_size} process(es), "
                                  f"this run has {self.dist.world_size}; resume with trainer.devices={state.world_size}")
        saved = OmegaConf.create(state.config)
        for key in trajectory_keys():  # the schema marks them: a checkpoint resumes only where they all agree
            ours, theirs = _plain(OmegaConf.select(cfg, key)), _plain(OmegaConf.select(saved, key))
            if key == "method" and isinstance(ours, dict) and isinstance(theirs, dict):
                theirs = {**{k: v for k, v in method_defaults(ours).items() if k in ours}, **theirs}
            if ours != theirs:
                name, theirs, ours = _first_difference(key, theirs, ours)
                raise CheckpointError(f"cannot resume from {path}: it was trained with {name}={theirs}, this "
                                      f"run has {name}={ours}; use a new run directory or resume=never")
        self.newest, self.resumed_from = state.describe(path), path
        return state

    def finished(self, state: Checkpoint | None, cfg) -> dict | None:
        """results.json of a run that is done (trained, and evaluated as this config asks), else None."""
        if state is None or not state.finished:
            return None
        try:
            results = json.loads(self.results_path.read_text())
        except (OSError, ValueError):
            return None
        return results if results.get("eval_settings") == eval_settings(cfg) else None

    def restore(self, state: Checkpoint, loop: LoopState) -> None:
        """Put `state` into the bound parts and `loop`."""
        parts, rank = self._parts, self.dist.rank
        try:
            parts.model.load_state_dict(state.model)
            parts.optimizer.load_state_dict(state.optimizer)
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"checkpoint does not match this model: {str(e).splitlines()[0][:200]}") from None
        if parts.scaler is not None and state.scaler:
            parts.scaler.load_state_dict(state.scaler)
        ranks = state.ranks or []
        mine = ranks[rank] if rank < len(ranks) else state.to_dict()  # a finished run re-evaluated elsewhere
        parts.method.load_state_dict(mine["method"])
        parts.loader.load_state_dict(state.loader)
        parts.counter.load_state_dict(mine["counter"])
        for k, v in state.loop.items():
            setattr(loop, k, v)
        parts.ctx.updates = state.updates
        set_rng_state(mine["rng"])

    # --- writing -------------------------------------------------------------------------------------------------
    def bind(self, *, model, optimizer, scaler, method, loader, counter, ctx, config: str, spec: dict) -> None:
        """The parts a checkpoint snapshots and a resume restores into (ctx: the TrainContext, for `updates`)."""
        self._parts = _Bound(model, optimizer, scaler, method, loader, counter, ctx, config, spec)

    def save(self, loop: LoopState, path: Path | None = None) -> str:
        """Write a checkpoint of the run at `loop` (every rank calls this); returns its path."""
        p, path = self._parts, path or self.last_path
        sync_buffers(p.model, self.dist)
        ranks = self.dist.gather(to_cpu({"method": p.method.state_dict(), "rng": rng_state(),
                                         "counter": p.counter.state_dict()}))
        if self.dist.is_main:
            record = Checkpoint(
                model=p.model.state_dict(), config=p.config, model_spec=p.spec, loop=vars(loop).copy(),
                optimizer=p.optimizer.state_dict(), scaler=p.scaler.state_dict() if p.scaler is not None else None,
                method=ranks[0]["method"], loader=p.loader.state_dict(), rng=ranks[0]["rng"],
                counter={"total": sum(r["counter"]["total"] for r in ranks)}, updates=p.ctx.updates,
                world_size=self.dist.world_size, ranks=ranks if self.dist.enabled else None,
                # Where the frozen companion models came from; they are the method's inputs, not its state.
                companions=dict(p.method.companions()))
            with self.reporting_full_disk(path):
                save_checkpoint(record, path)
                if path == self.last_path and loop.batch == 0 and self.keep > 0:
                    self._keep_epoch(loop.epoch)
            if path == self.last_path:
                self.newest = record.describe(path)
        self.dist.barrier()  # no rank moves on (or exits) before the checkpoint is on disk
        return str(path)

    def _keep_epoch(self, epoch: int) -> None:
        """last.pt, just written at the end of `epoch`, also as epoch_<epoch>.pt; the oldest beyond `keep` go."""
        kept = self.folder / f"epoch_{epoch:04d}.pt"
        tmp = self.folder / f".{kept.name}.link{TEMP_SUFFIX}"
        tmp.unlink(missing_ok=True)
        try:
            os.link(self.last_path, tmp)  # same bytes, no copy: last.pt is replaced by rename, never rewritten
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EMLINK, errno.EOPNOTSUPP):
                raise
            shutil.copyfile(self.last_path, tmp)  # a filesystem without hard links
        os.replace(tmp, kept)
        # Epochs past this one belong to a run this one replaced (resume=never): never resume into them.
        replaced = [p for p in self.epoch_files() if int(EPOCH_FILE.fullmatch(p.name).group(1)) > epoch]
        for old in replaced + self.epoch_files()[len(replaced) + self.keep:]:
            old.unlink(missing_ok=True)

    @contextmanager
    def reporting_full_disk(self, path: Path, kept: str | None = None):
        """A full disk is the user's to fix: one line that says so and what is kept, not torch's zip-writer
        traceback."""
        try:
            yield
        except Exception as e:
            if not is_disk_full(e):
                raise
            kept = kept or (f"the checkpoint {self.newest} is kept" if self.newest else "no earlier checkpoint exists")
            raise CheckpointError(f"no space left on device writing {path}; {kept}") from None


@dataclass
class _Bound:
    model: Any
    optimizer: Any
    scaler: Any
    method: Any
    loader: Any
    counter: Any
    ctx: Any
    config: str
    spec: dict


def _first_difference(key: str, theirs, ours) -> tuple[str, Any, Any]:
    """The first key where two sections differ ("method.adv_weight"), with both values; the section itself where
    it is no mapping or the method differs."""
    if isinstance(theirs, dict) and isinstance(ours, dict) and theirs.get("name") == ours.get("name"):
        for k in [*ours, *(k for k in theirs if k not in ours)]:
            if ours.get(k, "<absent>") != theirs.get(k, "<absent>"):
                return f"{key}.{k}", theirs.get(k, "<absent>"), ours.get(k, "<absent>")
    return key, theirs, ours


def _plain(value):
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
