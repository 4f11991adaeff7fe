"""results.json: the record of a run that scripts, `advtrain-report` and people read. Accuracies are fractions."""
from __future__ import annotations

import json
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from advtrain.engine.atomic import atomic_write


def versions() -> dict[str, str | None]:
    import torchvision

    from advtrain._version import __version__

    return {"advtrain": __version__, "git": _git_commit(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "python": platform.python_version(),
            "cuda": torch.version.cuda, "cudnn": str(torch.backends.cudnn.version())
            if torch.backends.cudnn.is_available() else None}


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def build_results(cfg, state, passes: float, n_train: int, scores: dict, rt, checkpoint: str,
                  world_size: int = 1, kind: str = "train", warnings: list[str] = (),
                  companions: dict[str, dict] | None = None, flops: dict[str, int] | None = None) -> dict[str, Any]:
    """`passes`: example-passes spent in training, summed over all ranks. `scores`: view name -> scores (one
    unnamed view for most methods). `kind`: "train" for a training run's own record, "eval" for advtrain-eval's
    evaluation of a checkpoint (advtrain-report never counts one as a run).

    "eval" holds the (first) view's scores, as scripts read them; a method with named views (OAT's lambdas) also gets
    "views": {name: scores}; `flops` (views whose forward cost differs, OATS' widths) is kept as
    "flops": {name: multiply-adds}."""
    from omegaconf import OmegaConf

    examples = n_train * max(state.epoch, 1)
    return {
        "kind": kind,
        "method": cfg.method.name, "dataset": cfg.dataset.name, "arch": cfg.arch.name,
        "epochs": cfg.trainer.epochs, "epochs_run": state.epoch, "seed": cfg.seed,
        "train_time_s": state.train_time_s, "epoch_times_s": list(state.epoch_times_s),
        "images_per_s": examples / max(state.train_time_s, 1e-9),
        "passes_per_example": passes / examples,
        "eval": next(iter(scores.values())), "stop_reason": state.stop_reason,
        # A method built on frozen models (RRM's teacher) cost their training too: both times, apart and summed.
        **({"companions": companions,
            "train_time_with_companions_s": state.train_time_s + sum(c["train_time_s"] for c in companions.values())}
           if companions else {}),
        **({"views": dict(scores)} if list(scores) != [""] else {}),
        **({"flops": dict(flops)} if flops else {}),
        # The evaluation's own doubts (AutoAttack's reliability checks): a number to read with care.
        "eval_warnings": list(warnings),
        "device": device_name(rt.device), "world_size": world_size, "precision": rt.precision,
        "batch_size": cfg.trainer.batch_size, "eps": cfg.dataset.eps, "checkpoint": checkpoint,
        # What the final evaluation ran: a rerun of a finished run with the same settings has nothing left to do.
        "eval_settings": eval_settings(cfg),
        "versions": versions(), "history": list(state.history),
        # The whole resolved config: advtrain-report compares runs only where everything that defines the
        # experiment agrees.
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def view_flops(views) -> dict[str, int]:
    """The views' forward multiply-adds where a method states them (OATS' widths), else nothing."""
    return {view.name: view.flops for view in views if view.flops is not None}


def attack_suite(cfg) -> dict:
    """The final evaluation's attacks, name -> spec, as plain data."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg.attack) if cfg.get("attack") else {}


def eval_settings(cfg) -> dict:
    """What the final evaluation runs; results.json records it so that a finished run is not evaluated again."""
    return {"attacks": attack_suite(cfg), "n": cfg.eval.n, "seed": cfg.eval.seed}


def write_results(results: dict[str, Any], path: Path) -> None:
    """Atomic, like checkpoints: a reader never sees half a file."""
    text = json.dumps(results, indent=2) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))
