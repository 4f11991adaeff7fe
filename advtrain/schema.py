"""The schema of every config section: one dataclass each, with defaults, types and units.

Methods declare their own section's schema next to their code (`Method.Config`); `pixel()` marks the fields in
[0, 1] pixel units that also accept fractions such as "8/255" (advtrain.config parses and range-checks them).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from omegaconf import MISSING


def pixel(default: Any = MISSING) -> Any:
    """A field in [0,1] pixel units (eps, step sizes); accepts floats and strings like "8/255"."""
    return field(default=default, metadata={"pixel": True})


@dataclass
class DatasetConfig:
    name: str = MISSING
    root: str = "data"
    download: bool = True
    check_md5: bool = True
    train_subset: Optional[int] = None      # use only the first N training examples
    val_size: int = 0                        # training examples held out for validation (never the test set)
    crop_padding: int = 0                    # pixels of zero padding for random crops (0 = no crop)
    flip: bool = False
    mean: List[float] = field(default_factory=lambda: [0.0])
    std: List[float] = field(default_factory=lambda: [1.0])
    eps: Any = pixel()                       # the threat model's radius for this dataset
    pgd_alpha: Any = pixel()                 # the papers' PGD step size for this dataset
    pgd_steps: int = 10                      # the papers' PGD step count for training attacks
    # synthetic only
    num_classes: Optional[int] = None
    shape: Optional[List[int]] = None             # [C, H, W]
    n_train: Optional[int] = None
    n_test: Optional[int] = None
    noise: Optional[float] = None
    # imagefolder only
    image_size: Optional[int] = None
    workers: Optional[int] = None


@dataclass
class ArchConfig:
    name: str = MISSING
    depth: Optional[int] = None
    widen_factor: Optional[int] = None
    dropout: float = 0.0


@dataclass
class OptimConfig:
    name: str = MISSING                      # sgd | adam
    lr: float = 0.1                          # peak learning rate
    momentum: float = 0.9                    # sgd
    nesterov: bool = False                   # sgd
    weight_decay: float = 5e-4
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])  # adam
    impl: str = "auto"                       # parameter-update kernels: auto | fused | foreach | loop


@dataclass
class ScheduleConfig:
    name: str = MISSING                      # constant | piecewise | cosine | cyclic
    milestones: List[float] = field(default_factory=lambda: [0.5, 0.75])  # piecewise: fractions of training
    gamma: float = 0.1                       # piecewise: LR factor at each milestone
    warmup: float = 0.0                      # fraction of training with a linear ramp from 0
    peak_at: float = 0.4                     # cyclic: fraction of training where the triangle peaks
    final_factor: float = 0.0                # cosine/cyclic: LR at the end, as a fraction of the peak


@dataclass
class TrainerConfig:
    epochs: int = 10
    batch_size: int = 128
    devices: int = 1                         # processes (one per device) this command starts on this node
    sync_bn: bool = False                    # with several devices: BatchNorm statistics over the global batch
    accelerator: str = "auto"                # auto | cpu | cuda
    precision: str = "auto"                  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    channels_last: str = "auto"              # auto (on CUDA) | true | false
    eps_warmup: float = 0.0                  # fraction of training over which eps and every attack step size
                                             # ramp up linearly from 0 (0: the full threat model from the start)
    compile: bool = False
    compile_mode: str = "default"            # torch.compile mode: default | reduce-overhead (CUDA graphs) | max-autotune
    deterministic: bool = False
    checkpoint_every: int = 1                # epochs between checkpoints; 0 = only at the end
    nan_check_every: int = 50                # steps between finiteness checks of the loss (each one syncs)
    progress: str = "auto"                   # auto (bar on a terminal, lines otherwise) | bar | lines | off
    log_every_s: float = 30.0                # seconds between plain progress lines


@dataclass
class EvalConfig:
    n: Optional[int] = None                  # test examples evaluated at the end (None = all)
    batch_size: int = 500
    every: int = 0                           # epochs between periodic evaluations (0 = only at the end)
    every_n: int = 1000                      # examples in each periodic evaluation
    seed: int = 0                            # the attacks' random starts: the same checkpoint gives the same numbers


@dataclass
class LoggerConfig:
    name: str = MISSING                      # wandb | none
    project: str = "advtrain"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    run_name: Optional[str] = None
    mode: str = "auto"                       # auto (offline without credentials) | online | offline | disabled
    init_timeout_s: float = 15.0             # W&B unreachable this long at the start: the run logs offline instead


@dataclass
class AttackConfig:
    type: str = MISSING                      # pgd | fgsm | cw | autoattack
    eps: Any = pixel()
    alpha: Any = pixel(None)                 # step size (pgd, cw)
    steps: int = 0
    restarts: int = 1
    norm: str = "linf"
    loss: str = "ce"
    version: str = "standard"                # autoattack
    seed: int = 0                            # autoattack
    attacks: Optional[List[str]] = None           # autoattack version=custom


TRAIN_SECTIONS = {"dataset": DatasetConfig, "arch": ArchConfig, "optim": OptimConfig, "schedule": ScheduleConfig,
                  "trainer": TrainerConfig, "eval": EvalConfig, "logger": LoggerConfig}
