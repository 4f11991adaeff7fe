"""Wall-clock accounting that excludes evaluation and checkpoint writing, with device syncs at the boundaries."""
from __future__ import annotations

import time

import torch


class Stopwatch:
    """Accumulates the time between start() and stop(); syncs CUDA so queued kernels are counted where they run."""

    def __init__(self, device: torch.device, elapsed: float = 0.0):
        self.device = device
        self.elapsed = elapsed
        self._t0: float | None = None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        self._sync()
        self._t0 = time.perf_counter()

    def stop(self) -> float:
        """Stop and return the seconds of this lap."""
        self._sync()
        lap = time.perf_counter() - self._t0
        self.elapsed += lap
        self._t0 = None
        return lap

    @property
    def running(self) -> bool:
        return self._t0 is not None

    def peek(self) -> float:
        """Elapsed time including the current lap, without a device sync (for progress displays)."""
        return self.elapsed + (time.perf_counter() - self._t0 if self._t0 is not None else 0.0)
