"""Checkpoints: written atomically, read with weights_only=True, so a checkpoint never executes code.

A checkpoint is a plain dict of tensors, numbers, strings and containers. The resolved config travels as YAML text,
never as a pickled object, so checkpoints keep loading after library upgrades.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from advtrain.engine.atomic import atomic_write

FORMAT = 1  # bump when the layout of the dict changes


class CheckpointError(Exception):
    """A user-facing, one-line checkpoint problem."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Atomic (advtrain.engine.atomic): a crash, a kill or a full disk leaves the previous checkpoint intact."""
    atomic_write(path, lambda f: torch.save({"format": FORMAT, **state}, f))


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for truncated, foreign or code-carrying files
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt or not an advtrain checkpoint "
                              f"(it cannot be read safely: {reason[:160]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or "model" not in state:
        raise CheckpointError(f"checkpoint {path} is not an advtrain checkpoint of format {FORMAT}")
    return state


def model_spec(cfg, info) -> dict:
    """What load_model needs to rebuild the network without the run's config files."""
    return {"arch": OmegaConf.to_container(cfg.arch), "method": OmegaConf.to_container(cfg.method),
            "num_classes": info.num_classes, "shape": list(info.shape), "mean": list(info.mean),
            "std": list(info.std), "dataset": cfg.dataset.name}


def build_network(spec: dict, method=None) -> torch.nn.Module:
    from advtrain.models import build_model

    arch = spec["arch"]
    model = build_model(arch["name"], num_classes=spec["num_classes"], in_shape=tuple(spec["shape"]),
                        mean=spec["mean"], std=spec["std"], depth=arch.get("depth"),
                        widen_factor=arch.get("widen_factor"), dropout=arch.get("dropout", 0.0))
    return method.wrap_model(model) if method is not None else model


def model_from_checkpoint(state: dict[str, Any]):
    """Rebuild (method, model) from a loaded checkpoint: the architecture, any change the method made, the weights."""
    from advtrain.data import DatasetInfo
    from advtrain.methods import build_method

    spec = state["model_spec"]
    info = DatasetInfo(name=spec["dataset"], num_classes=spec["num_classes"], shape=tuple(spec["shape"]),
                       mean=tuple(spec["mean"]), std=tuple(spec["std"]), n_train=0, n_val=0, n_test=0)
    method = build_method(OmegaConf.create(spec["method"]), info)
    model = build_network(spec, method)
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as e:
        raise CheckpointError(f"checkpoint weights do not match its recorded model ({spec['arch']['name']}): "
                              f"{str(e).splitlines()[0][:200]}") from None
    return method, model
