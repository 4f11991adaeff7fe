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
    from advtrain.engine.checkpoint import load_checkpoint
    from advtrain.engine.network import model_from_checkpoint
    from advtrain.errors import CheckpointError
    from advtrain.models import bind

    method, model = model_from_checkpoint(load_checkpoint(path, map_location=device))
    if view is not None:
        views = {v.name: v for v in method.eval_views()}
        if view not in views:
            raise CheckpointError(f"view={view!r} is not a view of this checkpoint's method; its views: "
                                  f"{', '.join(repr(v) for v in views)}")
        model = bind(model, views[view].cond)
    return model.to(device).eval()


__all__ = ["load_model", "__version__"]
