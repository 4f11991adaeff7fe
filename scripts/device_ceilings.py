#!/usr/bin/env python
"""What this device can do at best, measured: dense matmul FLOP/s at bf16 and fp32, and on-device copy bandwidth.

    python scripts/device_ceilings.py --json ceilings.json            # 8192³ matmuls, a 1 GiB copy
    python scripts/device_ceilings.py --n 256 --copy-mib 16            # toy size (the CPU smoke check)

Every training number is read against these: a step's useful FLOP/s over the bf16 matmul rate says how much of the
device it uses. Random data (a matmul of zeros can run faster on some hardware), two untimed calls first, then
`reps` calls between two CUDA events (on the CPU, between two clock reads: its kernels run synchronously).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def timed(fn, device: torch.device, reps: int) -> float:
    """Seconds for `reps` calls of fn, after two untimed ones."""
    for _ in range(2):
        fn()
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return time.perf_counter() - t0


def matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 8192, reps: int = 30) -> float:
    """FLOP/s of an n×n by n×n matmul at `dtype` (2n³ FLOPs each)."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    out = torch.empty(n, n, device=device, dtype=dtype)
    return 2 * n**3 * reps / timed(lambda: torch.matmul(a, b, out=out), device, reps)


def copy_bandwidth(device: torch.device, mib: int = 1024, reps: int = 20) -> float:
    """Bytes per second a device-to-device copy moves, reads and writes counted (2 × the tensor's size per copy)."""
    src = torch.empty(mib * 2**20, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    return 2 * src.numel() * reps / timed(lambda: dst.copy_(src), device, reps)


def ceilings(device: torch.device, n: int, copy_mib: int) -> dict:
    reps = 30 if device.type == "cuda" else 4
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here, whatever the process set
    try:
        fp32 = matmul_flops(device, torch.float32, n, reps)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "matmul_n": n, "matmul_reps": reps,
        "bf16_matmul_tflops": matmul_flops(device, torch.bfloat16, n, reps) / 1e12,
        "fp32_matmul_tflops": fp32 / 1e12,
        "copy_mib": copy_mib,
        "copy_gb_per_s": copy_bandwidth(device, copy_mib, reps) / 1e9,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=8192, help="matmul size n (n×n by n×n; default 8192)")
    parser.add_argument("--copy-mib", type=int, default=1024, help="MiB copied per copy (default 1024)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, help="also write the results here")
    opts = parser.parse_args(argv)
    result = ceilings(torch.device(opts.device), opts.n, opts.copy_mib)
    print(f"{result['device']}: bf16 matmul {result['bf16_matmul_tflops']:.4g} TFLOP/s, fp32 matmul "
          f"{result['fp32_matmul_tflops']:.4g} TFLOP/s ({opts.n}³), copy {result['copy_gb_per_s']:.4g} GB/s "
          "(read + write)")
    if opts.json:
        opts.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
