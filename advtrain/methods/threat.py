"""The threat model a method trains against: its settings in pixel units (eps, step sizes, start radii: the Config's
pixel() fields) at the ε warm-up's current scale.

trainer.eps_warmup ramps the threat model up from 0 over the first part of training; the loop sets `scale` at every
minibatch, like the LR. A method reads its pixel settings as `self.threat.eps`, never `self.cfg.eps`, so every
attack step size and radius follows the ramp; `self.cfg` keeps the configured values (the overfitting guard attacks
at them, so that its epochs compare one threat model). A method built inside another from its settings (AWP's
base, RAT's TRADES) shares the outer one's ThreatModel (`Method.share_threat`): one scale reaches both.
"""
from __future__ import annotations

from dataclasses import fields
from typing import Any


class ThreatModel:
    """`threat.<pixel field>`: the configured value times `scale` (None stays None; at scale 1 exactly the configured
    value); `scale` in [0, 1], 1 without a warm-up or once it is over. Other settings are not read here."""

    def __init__(self, cfg: Any, config: type):
        self.scale = 1.0
        self._cfg = cfg
        self._pixel = frozenset(f.name for f in fields(config) if f.metadata.get("pixel"))

    def configured(self) -> dict[str, Any]:
        """The pixel settings at scale 1, by name."""
        return {name: getattr(self._cfg, name) for name in self._pixel if hasattr(self._cfg, name)}

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name not in self._pixel:  # "_": a copy or pickle looks before __init__ ran
            raise AttributeError(f"{name!r} is not a setting in pixel units (a pixel() field of the method's Config)")
        value = getattr(self._cfg, name)
        return value if value is None or self.scale == 1.0 else value * self.scale
