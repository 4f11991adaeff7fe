"""The network a run trains, assembled from its spec: the architecture, the method's changes to it, the dataset's
shape and normalization. A checkpoint carries the spec (`model_spec`), so any checkpoint rebuilds its network without
the run's config files."""
from __future__ import annotations

from typing import Any

import torch
from omegaconf import OmegaConf

from advtrain.data import DatasetInfo
from advtrain.errors import CheckpointError, UserError
from advtrain.methods import build_method, method_defaults
from advtrain.models import build_model


def model_spec(cfg, info, companions: dict[str, dict] | None = None) -> dict:
    """What load_model needs to rebuild the network without the run's config files. `companions`: the model specs
    of the method's frozen companions, whose shapes a method may build on (RRM's projection to its teacher's
    features); their weights are not needed to rebuild this network."""
    return {"arch": OmegaConf.to_container(cfg.arch), "method": OmegaConf.to_container(cfg.method),
            "num_classes": info.num_classes, "shape": list(info.shape), "mean": list(info.mean),
            "std": list(info.std), "dataset": cfg.dataset.name, "companions": dict(companions or {})}


def build_network(spec: dict, method=None, companions: dict[str, torch.nn.Module] | None = None) -> torch.nn.Module:
    """The network of `spec`, changed by `method`'s wrap_model, which sees the companions (the loaded ones while
    training; otherwise models of their architecture rebuilt from the specs `spec` records, untrained)."""
    arch = spec["arch"]
    model = build_model(arch["name"], num_classes=spec["num_classes"], in_shape=tuple(spec["shape"]),
                        mean=spec["mean"], std=spec["std"], depth=arch.get("depth"),
                        widen_factor=arch.get("widen_factor"), dropout=arch.get("dropout", 0.0))
    if method is None:
        return model
    if companions is None:
        companions = {name: _skeleton(s) for name, s in spec.get("companions", {}).items()}
    return method.wrap_model(model, companions)


def _skeleton(spec: dict) -> torch.nn.Module:
    return build_network(spec, stored_method(spec))


def stored_method(spec: dict):
    """The method a checkpoint's spec names, with its recorded settings; a setting the method gained after the
    checkpoint was written (a knob added in a later version) takes its default, so old checkpoints still load."""
    recorded = dict(spec["method"])
    return build_method(OmegaConf.create({**method_defaults(recorded), **recorded}), spec_info(spec))


def spec_info(spec: dict) -> DatasetInfo:
    return DatasetInfo(name=spec["dataset"], num_classes=spec["num_classes"], shape=tuple(spec["shape"]),
                       mean=tuple(spec["mean"]), std=tuple(spec["std"]), n_train=0, n_val=0, n_test=0)


def model_from_checkpoint(state):
    """Rebuild (method, model) from a loaded checkpoint (engine.checkpoint.Checkpoint): the architecture, any change
    the method made, the weights."""
    spec, source = state.model_spec, getattr(state, "source", "the checkpoint")
    try:
        method = stored_method(spec)
        model = build_network(spec, method)
    except (UserError, KeyError, TypeError, ValueError, AttributeError) as e:
        reason = str(e).strip() or type(e).__name__
        raise CheckpointError(f"checkpoint {source} records a model this advtrain cannot rebuild ({reason[:200]})") from None
    try:
        model.load_state_dict(state.model)
    except (RuntimeError, KeyError) as e:
        raise CheckpointError(f"checkpoint weights do not match its recorded model ({spec['arch']['name']}): "
                              f"{str(e).splitlines()[0][:200]}") from None
    return method, model
