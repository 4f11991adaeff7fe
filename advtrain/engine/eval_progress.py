"""A final evaluation's progress, kept on disk batch by batch, so that one stopped by a preemption, a crash or Ctrl-C
goes on from its last finished batch when the command is run again, with the numbers an uninterrupted evaluation
gives: AutoAttack on a CIFAR test set takes hours, and a requeued job should not pay them twice.

After every evaluation batch the file (written atomically) holds each view's counts so far, the number of batches
done, the warnings met, and the RNG state the next batch starts from (the attacks' random starts draw from it). A
rerun skips the finished batches without attacking them, restores that RNG state and carries on. The file also holds
what the numbers depend on: the model's weights (a SHA-256 of its state dict), the attack suite, n, the batch size,
the seed, the views and the rank's place. A file written for anything else is ignored and the evaluation starts
over. It is read with weights_only=True (plain tensors, numbers and strings) and removed once results.json is
written. With several ranks each keeps its own file (eval_progress.rank<r>.pt).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from advtrain.engine.atomic import atomic_write
from advtrain.engine.precision import rng_state, set_rng_state


def progress_path(run_dir: Path, rank: int = 0, world_size: int = 1) -> Path:
    return run_dir / ("eval_progress.pt" if world_size == 1 else f"eval_progress.rank{rank}.pt")


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of the model's state dict (names, dtypes, shapes and values): which weights were evaluated."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        flat = t.detach().cpu().reshape(-1)  # 1-d: a 0-d tensor (BN's num_batches_tracked) cannot be viewed as bytes
        h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class EvalProgress:
    """The progress file of one evaluation request (see the module's docstring)."""

    def __init__(self, path: Path, model: nn.Module, suite: Mapping[str, Mapping], *, n: int | None,
                 batch_size: int, seed: int, views: Sequence[str], rank: int = 0, world_size: int = 1):
        self.path = Path(path)
        self.key = json.dumps({"weights": weights_digest(model), "suite": suite, "n": n, "batch_size": batch_size,
                               "seed": seed, "views": list(views), "rank": rank, "world_size": world_size},
                              sort_keys=True, default=str)
        self.views: dict[str, dict] = {}   # view -> {"counts", "total", "batches"}
        self.found: list[str] = []
        self.rng: dict | None = None
        self._load()

    def _load(self) -> None:
        if not self.path.is_file():
            return
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception:  # unreadable: start over (the next save replaces it)
            return
        if not isinstance(saved, dict) or saved.get("key") != self.key:  # another evaluation's: start over
            return
        self.views, self.found, self.rng = saved["views"], list(saved["found"]), saved["rng"]

    def done(self, view: str) -> tuple[dict[str, int], int, int]:
        """(counts, examples, batches) already evaluated in this view; zeros for a fresh one."""
        v = self.views.get(view)
        return (dict(v["counts"]), int(v["total"]), int(v["batches"])) if v else ({}, 0, 0)

    def restore_rng(self) -> None:
        """Before the first batch this process attacks: the RNG state that batch started from the first time (once;
        nothing to do on a fresh evaluation)."""
        if self.rng is not None:
            set_rng_state(self.rng)
            self.rng = None

    def save(self, view: str, counts: Mapping[str, int], total: int, batches: int, found: Sequence[str]) -> None:
        self.views[view] = {"counts": dict(counts), "total": total, "batches": batches}
        self.found, self.rng = list(found), rng_state()
        payload = {"key": self.key, "views": self.views, "found": self.found, "rng": self.rng}
        atomic_write(self.path, lambda f: torch.save(payload, f))

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
