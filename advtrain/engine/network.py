"""The network a run trains, assembled from its spec: the architecture, the method's changes to it, the dataset's
shape and normalization. A checkpoint carries the spec (`model_spec`), so any checkpoint rebuilds its network without
the run's config files."""
from __future__ import annotations

from typing import Any

import torch
from omegaconf import OmegaConf

from advtrain.data import DatasetInfo
from advtrain.errors import CheckpointError
from advtrain.methods import build_method
from advtrain.models import build_model


def model_spec(cfg, info) -> dict:
    """What load_model needs to rebuild the network without the run's config files."""
    return {"arch": OmegaConf.to_container(cfg.arch), "method": OmegaConf.to_container(cfg.method),
            "num_classes": info.num_classes, "shape": list(info.shape), "mean": list(info.mean),
            "std": list(info.std), "dataset": cfg.dataset.name}


def build_network(spec: dict, method=None) -> torch.nn.Module:
    arch = spec["arch"]
    model = build_model(arch["name"], num_classes=spec["num_classes"], in_shape=tuple(spec["shape"]),
                        mean=spec["mean"], std=spec["std"], depth=arch.get("depth"),
                        widen_factor=arch.get("widen_factor"), dropout=arch.get("dropout", 0.0))
    return method.wrap_model(model) if method is not None else model


def model_from_checkpoint(state: dict[str, Any]):
    """Rebuild (method, model) from a loaded checkpoint: the architecture, any change the method made, the weights."""
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
