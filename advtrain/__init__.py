"""advtrain: config-driven, fast adversarial training of image classifiers.

    from advtrain import load_model
    model = load_model("outputs/.../checkpoints/last.pt")   # eval mode, inputs in [0, 1], returns logits
"""
from __future__ import annotations

from advtrain._version import __version__


def load_model(path, device="cpu"):
    """The trained network from an advtrain checkpoint, in eval mode, taking [0, 1] inputs (normalization is
    inside), ready for any external attack library. Loads with weights_only=True: no code from the file runs."""
    from advtrain.engine.checkpoint import load_checkpoint
    from advtrain.engine.network import model_from_checkpoint

    _, model = model_from_checkpoint(load_checkpoint(path, map_location=device))
    return model.to(device).eval()


__all__ = ["load_model", "__version__"]
