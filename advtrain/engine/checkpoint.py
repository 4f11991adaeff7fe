"""Checkpoints: written atomically, read with weights_only=True, so a checkpoint never executes code.

A checkpoint is a plain dict of tensors, numbers, strings and containers. The resolved config travels as YAML text,
never as a pickled object, so checkpoints keep loading after library upgrades.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from advtrain.engine.atomic import atomic_write
from advtrain.errors import CheckpointError

FORMAT = 1  # bump when the layout of the dict changes


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
