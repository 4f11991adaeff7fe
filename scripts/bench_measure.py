"""How scripts/bench.py times and counts: windows of steps between device syncs, per-step marks that split attack
from update without syncing, matmul/conv FLOPs from torch.utils.flop_counter's formulas, the matmul rate of the
device, and the host syncs torch reports inside a step."""
from __future__ import annotations

import statistics
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from advtrain.engine.timing import Stopwatch
from device_ceilings import matmul_flops


@dataclass
class Row:
    name: str
    images_per_s: float | None = None
    vs_fast_path: float | None = None
    passes_per_example: float | None = None
    attack_share: float | None = None      # of step time
    update_share: float | None = None
    peak_memory_mib: float | None = None   # CUDA: peak allocated, device-resident data included; CPU: not tracked
    flops_per_image: float | None = None   # matmul/conv FLOPs of one training step, per image
    matrix_tflops: float | None = None     # counted matmul/conv FLOPs per second
    of_matrix_rate: float | None = None    # matrix_tflops / the matmul rate measured here
    host_syncs_per_step: float | None = None  # CUDA: syncs torch reported in two steps, per step
    spread: float | None = None            # (slowest - fastest window) / median: the noise of this row
    error: str | None = None

    def set_speed(self, images_per_window: int, seconds: list[float]) -> None:
        rates = sorted(images_per_window / s for s in seconds)
        self.images_per_s = statistics.median(rates)
        self.spread = (rates[-1] - rates[0]) / self.images_per_s


class Marks:
    """Timestamps without host syncs: CUDA events on a GPU, perf_counter on the CPU (which runs synchronously)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.items: list[tuple[str, object]] = []

    def mark(self, what: str) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.items.append((what, event))
        else:
            self.items.append((what, time.perf_counter()))

    def seconds(self, a, b) -> float:
        return a.elapsed_time(b) / 1e3 if self.cuda else b - a

    def split(self) -> tuple[float, float]:
        """(attack, update) seconds over the marked steps: an update runs from its first forward to the end of its
        optimizer step; the rest of each step is the attack's (with the step's small other work). Call after the
        device is synced."""
        total = update = 0.0
        step_start = update_start = None
        for what, t in self.items:
            if what == "step":
                if step_start is not None:
                    total += self.seconds(step_start, t)
                step_start = t
            elif what == "step_end":
                total += self.seconds(step_start, t)
                step_start = None
            elif what == "update_forward" and update_start is None:
                update_start = t
            elif what == "update_end" and update_start is not None:
                update += self.seconds(update_start, t)
                update_start = None
        return total - update, update


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


class Runner:
    """One way of training, built and warmed up, stepped in timed windows that alternate with the other runners'
    so that slow drifts of the machine (clocks, other load) fall on every row alike."""

    def __init__(self, name: str, device: torch.device, batch_size: int):
        self.name, self.device, self.batch_size = name, device, batch_size
        self.seconds: list[float] = []
        self.resident = 0      # bytes this runner keeps on the device between steps (model, optimizer, data)
        self.peak = 0          # bytes above what was allocated when its windows started, at most

    def step(self) -> None:
        raise NotImplementedError

    @contextmanager
    def settings(self):
        """Global switches this runner needs while it steps."""
        yield

    def warm_up(self, steps: int, allocated_before: int) -> None:
        with self.settings():
            for _ in range(steps):
                self.step()
        sync(self.device)
        self.resident = allocated(self.device) - allocated_before

    def window(self, steps: int) -> None:
        with self.settings():
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            start_bytes = allocated(self.device)
            watch = Stopwatch(self.device)
            watch.start()
            for _ in range(steps):
                self.step()
            self.end_window()
            self.seconds.append(watch.stop())
            if self.device.type == "cuda":
                self.peak = max(self.peak, torch.cuda.max_memory_allocated(self.device) - start_bytes)

    def begin(self) -> None:
        """Called once before the first timed window."""

    def end_window(self) -> None:
        pass

    def row(self, steps: int) -> Row:
        row = Row(self.name, peak_memory_mib=(self.resident + self.peak) / 2**20 if self.device.type == "cuda" else None)
        row.set_speed(steps * self.batch_size, self.seconds)
        return row


def count_syncs(step, device: torch.device, steps: int = 2) -> float | None:
    """Host-device syncs inside the step, as torch's sync debug mode reports them (CUDA only)."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                step()
            torch.cuda.synchronize(device)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught) / steps


class MatrixFlops(TorchDispatchMode):
    """Sums torch.utils.flop_counter's per-op formulas (matmuls, convolutions, attention) over what runs inside.
    FlopCounterMode itself also tracks modules with global hooks that autograd.grad (every attack step) rejects."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def matrix_rate(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matmul on this device at `dtype`: the attainable peak the step is held against."""
    n, reps = (8192, 30) if device.type == "cuda" else (1024, 8)
    return matmul_flops(device, dtype, n, reps)
