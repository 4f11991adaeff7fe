"""advtrain: config-driven, fast adversarial training of image classifiers.

    from advtrain import load_model
    model = load_model("outputs/.../checkpoints/last.pt")   # eval mode, inputs in [0, 1], returns logits
"""
from __future__ import annotations

from advtrain._version import __version__


def load_model(path, device="cpu", view: str | None = None):
    """The trained network from an advtrain checkpoint, in eval mode, taking [0, 1] inputs (normalization is
    inside), ready for any external attack library. Loads with weights_only=True: no code from the file runs.

    `view`: for a method evaluated in several settings (results.json's "views", e.g. OAT's lambdas), the model fixed
    to that one, a plain x -> logits module."""
    from advtrain.engine.checkpoint import Checkpoint
    from advtrain.engine.network import model_from_checkpoint
    from advtrain.errors import CheckpointError
    from advtrain.models import bind

    state = Checkpoint.load(path, map_location=device)
    method, model = model_from_checkpoint(state)
    views = {v.name: v for v in method.views()}
    if view is None and "" not in views and not _callable_plain(model, state.model_spec["shape"]):
        # A network conditioned on its view (OAT's lambda) fails on its first call without one: say so here.
        raise CheckpointError(f"{path} holds one network for several views of method "
                              f"{state.model_spec['method']['name']!r}, which needs its view: load one with "
                              f"load_model(path, view=...), one of {', '.join(repr(v) for v in views)}")
    if view is not None:
        if view not in views:
            raise CheckpointError(f"view={view!r} is not a view of this checkpoint's method; its views: "
                                  f"{', '.join(repr(v) for v in views)}")
        model = bind(model, views[view].cond)
    return model.to(device).eval()


def _callable_plain(model, shape) -> bool:
    """Whether the network answers without a view (one zero image through it)."""
    import torch

    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *shape))
        return True
    except Exception:  # noqa: BLE001 - whatever the conditioned layers raise, the answer is "needs a view"
        return False


__all__ = ["load_model", "__version__"]
