"""Device, numeric precision and memory-format choices, resolved once from the trainer config."""
from __future__ import annotations

import os
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from advtrain.errors import ConfigError


@dataclass
class Runtime:
    device: torch.device
    precision: str                    # fp32 | bf16 | fp16
    channels_last: bool
    autocast: Callable                # () -> context manager
    scaler: torch.amp.GradScaler | None


def resolve_accelerator(cfg) -> str:
    accel = cfg.accelerator
    if accel == "auto":
        accel = "cuda" if torch.cuda.is_available() else "cpu"
    if accel == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.accelerator=cuda but no CUDA device is visible; use trainer.accelerator=cpu")
    return accel


def resolve_runtime(cfg, local_rank: int = 0) -> Runtime:
    """`local_rank`: this process's device on its node (one CUDA device per rank)."""
    accel = resolve_accelerator(cfg)
    device = torch.device(accel, local_rank) if accel == "cuda" else torch.device(accel)
    if accel == "cuda":
        torch.cuda.set_device(device)
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if accel == "cuda" else "fp32"
    if precision == "fp16" and accel == "cpu" and local_rank == 0:
        print("warning: trainer.precision=fp16 brings no speed on the CPU (it has no fast fp16 kernels) and only "
              "adds loss scaling; fp32 (the CPU default) or bf16 are the CPU's choices", file=sys.stderr)
    if precision == "fp32":
        autocast = nullcontext
    else:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        autocast = partial(torch.autocast, device_type=device.type, dtype=dtype)
    # fp16 needs loss scaling so small gradients do not flush to zero; bf16 has fp32's exponent range.
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    channels_last = accel == "cuda" if cfg.channels_last == "auto" else str(cfg.channels_last).lower() == "true"
    return Runtime(device, precision, channels_last, autocast, scaler)


def seed_everything(seed: int, deterministic: bool) -> None:
    torch.manual_seed(seed)  # seeds CPU and every CUDA device
    if deterministic:
        # cuBLAS needs a fixed workspace for reproducible matmuls; must be set before the first cuBLAS call.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True  # autotune conv kernels: the shapes are fixed during training


def rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
