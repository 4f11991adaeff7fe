#!/usr/bin/env python
"""Where a training step's time goes: the top kernels of advtrain's fast path under torch.profiler.

    python scripts/bench_profile.py --json profile.json method=pgd method.steps=10 arch=preact_resnet18 \
        dataset.shape=[3,32,32] dataset.num_classes=10 dataset.crop_padding=4 dataset.flip=true trainer.batch_size=512

Positional arguments are advtrain overrides, as for scripts/bench.py (the same step, the same synthetic data). On a
GPU the table lists CUDA kernels by their summed device time; on the CPU, operators by their own CPU time. `busy`
is the summed kernel time over the wall time of the profiled steps: well below 1 means the GPU waits on the host
(Python, kernel launches), and fewer, larger kernels (torch.compile, CUDA graphs) are what would help.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import DEFAULTS, Ours, Variant, sized  # noqa: E402
from bench_measure import sync  # noqa: E402


def _device_time(event) -> float:
    """Microseconds an aggregated event spent on the device itself (the attribute was renamed in torch 2.4)."""
    return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)


def top_kernels(runner: Ours, steps: int, top: int) -> dict:
    cuda = runner.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with runner.settings():
        sync(runner.device)
        t0 = time.perf_counter()
        with profile(activities=activities) as prof:
            for _ in range(steps):
                runner.step()
            sync(runner.device)
        wall_us = (time.perf_counter() - t0) * 1e6
    events = prof.key_averages()
    if cuda:
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        time_of = _device_time
    else:
        kernels = [e for e in events if e.self_cpu_time_total > 0]
        time_of = lambda e: e.self_cpu_time_total  # noqa: E731
    total = sum(time_of(e) for e in kernels) or 1.0
    rows = sorted(kernels, key=time_of, reverse=True)[:top]
    return {
        "clock": "cuda kernels" if cuda else "cpu operators",
        "steps": steps,
        "wall_ms_per_step": wall_us / steps / 1e3,  # with the profiler's own overhead
        "kernel_ms_per_step": total / steps / 1e3,
        "busy": total / wall_us,
        "top": [{"name": e.key[:120], "ms_per_step": time_of(e) / steps / 1e3, "share": time_of(e) / total,
                 "calls_per_step": e.count / steps} for e in rows],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="overrides: advtrain config overrides")
    parser.add_argument("--steps", type=int, default=5, help="profiled training steps (default 5)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--top", type=int, default=10, help="rows of the table (default 10)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    opts, overrides = parser.parse_known_args(argv)
    base = sized(DEFAULTS + overrides, opts.warmup + opts.steps + 2)
    runner = Ours(Variant("fast path (advtrain)"), base, workers=0)
    runner.warm_up(opts.warmup, 0)
    result = {"overrides": base, **top_kernels(runner, opts.steps, opts.top)}
    print(f"{result['clock']}: {result['kernel_ms_per_step']:.3g} ms of {result['wall_ms_per_step']:.3g} ms per "
          f"step busy ({result['busy']:.0%})")
    for row in result["top"]:
        print(f"  {row['share']:6.1%}  {row['ms_per_step']:8.3f} ms  {row['calls_per_step']:6.1f}×  {row['name']}")
    if opts.json:
        opts.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
