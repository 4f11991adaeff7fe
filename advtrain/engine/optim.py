"""Optimizers and learning-rate schedules.

Schedules are functions of training progress p in [0, 1] (epochs done / epochs), set at every minibatch, so one
definition serves methods that update once per batch and methods that replay it (FREE, DEAT), and a run's LR curve
keeps its shape when the number of epochs changes. Milestones and peaks are fractions of training.
"""
from __future__ import annotations

import math

import torch


def build_optimizer(cfg, params) -> torch.optim.Optimizer:
    kernels = _kernels(cfg.get("impl", "auto"))
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay, **kernels)
    return torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, **kernels)


def resolve_impl(impl: str) -> str:
    """`auto` takes what scripts/bench.py measured fastest (docs/performance.md): foreach on CPU, where loop, foreach
    and fused were within noise; the GPU measurement is still to be made."""
    return "foreach" if impl == "auto" else impl


def _kernels(impl: str) -> dict:
    """How parameter updates are launched: `loop` one small kernel chain per tensor (the papers' code), `foreach`
    batched over all tensors, `fused` one kernel doing the whole update."""
    impl = resolve_impl(impl)
    return {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}[impl]


def lr_factor(cfg, progress: float) -> float:
    """LR as a fraction of the peak LR at training progress `progress` in [0, 1]."""
    p = min(max(progress, 0.0), 1.0)
    if cfg.warmup > 0 and p < cfg.warmup:
        return p / cfg.warmup
    if cfg.name == "constant":
        return 1.0
    if cfg.name == "piecewise":
        return cfg.gamma ** sum(p >= m for m in cfg.milestones)
    if cfg.name == "cosine":
        t = (p - cfg.warmup) / max(1.0 - cfg.warmup, 1e-12)
        return cfg.final_factor + (1 - cfg.final_factor) * 0.5 * (1 + math.cos(math.pi * t))
    # cyclic: the triangle of Wong et al., 0 -> peak at `peak_at` -> final_factor at the end
    if p <= cfg.peak_at:
        return p / cfg.peak_at if cfg.peak_at > 0 else 1.0
    return 1.0 - (1.0 - cfg.final_factor) * (p - cfg.peak_at) / (1.0 - cfg.peak_at)


def set_lr(optimizer: torch.optim.Optimizer, peak_lr: float, factor: float) -> float:
    lr = peak_lr * factor
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr
