"""Batched random crop (zero padding) and horizontal flip, run on the device where the batch lives.

Crop and flip are drawn per example and returned, so the same geometry can be applied to another per-example tensor
(a stored perturbation delta kept in the original image frame must follow its example through crops and flips).
"""

import torch
import torch.nn.functional as F
from torch import Tensor


def sample_augmentation(
    n: int, padding: int, flip: bool, generator: torch.Generator
) -> tuple[Tensor | None, Tensor | None]:
    """Crop offsets (n,2) int64 in [0, 2*padding] (dy, dx) and flip flags (n,) bool, or None where switched off."""
    device = generator.device
    crop = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator, device=device) if padding else None
    flips = torch.randint(0, 2, (n,), generator=generator, device=device).bool() if flip else None
    return crop, flips


def apply_augmentation(t: Tensor, crop: Tensor | None, flip: Tensor | None, padding: int) -> Tensor:
    """Crop each example of t (B,C,H,W) at its (dy, dx) inside the image zero-padded by `padding` pixels on every
    side, then mirror it left-right where flip is True. Differentiable in t; works for uint8 and float alike."""
    if crop is not None:
        batch, channels, height, width = t.shape
        padded = F.pad(t, (padding, padding, padding, padding))
        device = t.device
        rows = crop[:, 0, None] + torch.arange(height, device=device)  # (B,H) rows of the padded image
        cols = crop[:, 1, None] + torch.arange(width, device=device)  # (B,W)
        # One gather: the four index tensors broadcast to (B,C,H,W).
        t = padded[
            torch.arange(batch, device=device)[:, None, None, None],
            torch.arange(channels, device=device)[None, :, None, None],
            rows[:, None, :, None],
            cols[:, None, None, :],
        ]
    if flip is not None:
        t = torch.where(flip[:, None, None, None], t.flip(-1), t)
    return t


def invert_augmentation(t: Tensor, crop: Tensor | None, flip: Tensor | None, padding: int,
                        into: Tensor | None = None) -> Tensor:
    """Undo apply_augmentation for a per-example tensor: map t (B,C,H,W), in the augmented frame, back to the
    original image frame. Pixels the crop window left out (it shows padding instead) keep their values from `into`
    (B,C,H,W, original frame; needed only with crops); the window's padding pixels are dropped. Used to store a
    perturbation per example."""
    if flip is not None:
        t = torch.where(flip[:, None, None, None], t.flip(-1), t)
    if crop is None:
        return t
    if into is None:
        raise ValueError("with crops, `into` must give the pixels the crop window does not cover")
    batch, channels, height, width = t.shape
    device = t.device
    canvas = F.pad(into, (padding, padding, padding, padding))
    rows = crop[:, 0, None] + torch.arange(height, device=device)
    cols = crop[:, 1, None] + torch.arange(width, device=device)
    canvas[
        torch.arange(batch, device=device)[:, None, None, None],
        torch.arange(channels, device=device)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ] = t
    return canvas[:, :, padding:padding + height, padding:padding + width]
