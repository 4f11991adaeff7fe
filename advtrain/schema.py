"""The schema of every config section: one dataclass each, with defaults, types and units.

Methods declare their own section's schema next to their code (`Method.Config`, a `MethodConfig`); `pixel()` marks
the fields in [0, 1] pixel units that also accept fractions such as "8/255", `choice()` the fields with a fixed set
of values, `in_range()` the numbers with bounds (step counts, fractions of training, seeds); advtrain.config parses
and checks all three, naming the field and what is valid. Every float of every section must also be finite.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, List, Optional

from omegaconf import MISSING


def pixel(default: Any = MISSING) -> Any:
    """A field in [0,1] pixel units (eps, step sizes); accepts floats and strings like "8/255"."""
    return field(default=default, metadata={"pixel": True})


def choice(*options: str, default: Any = None, trajectory: bool = False) -> Any:
    """A field that takes one of `options`, listed in this order in messages; the default is the first unless
    `default` says otherwise (MISSING: the YAML must choose)."""
    return field(default=options[0] if default is None else default,
                 metadata={"choices": options, "trajectory": trajectory})


def in_range(low: float, high: float | None = None, default: Any = MISSING, *, what: str, factory: Any = None,
             trajectory: bool = False) -> Any:
    """A number in [low, high] (no upper bound when high is None), or a list of such numbers; None passes where the
    type allows it. `what` names the quantity in messages, e.g. "the attack's step count (0: no attack steps)"."""
    metadata = {"range": (low, high), "what": what, "trajectory": trajectory}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def attack_steps(default: Any = MISSING, *, zero: str | None = None) -> Any:
    """A method's attack step count: at least 1, or at least 0 where the method gives 0 a meaning (`zero` says which:
    under steps_schedule=magnitude, PGD-AT and TRADES start from 0 steps)."""
    if zero is None:
        return in_range(1, None, default, what="the attack's step count")
    return in_range(0, None, default, what=f"the attack's step count (0: {zero})")


def count(default: Any = MISSING, *, low: int = 1, what: str) -> Any:
    """A whole number of something (replays, examples, epochs) of at least `low`."""
    return in_range(low, None, default, what=what)


SEED_MAX = 2**64 - 1  # torch.manual_seed's largest seed; numpy's SeedSequence (the data split) takes no negative one
SEED = "a seed (for torch and numpy)"
FRACTION = "a fraction of training"


def traj(default: Any = MISSING, *, factory: Any = None) -> Any:
    """A field that shapes the training trajectory: a checkpoint resumes only into a run that agrees on it."""
    if factory is not None:
        return field(default_factory=factory, metadata={"trajectory": True})
    return field(default=default, metadata={"trajectory": True})


@dataclass
class MethodConfig:
    """The fields every method section has. `name` selects the method (advtrain/methods/<name>.py); a method that
    lives outside advtrain names its class in `_target_` instead (e.g. my_package.my_method.MyMethod)."""
    name: str = MISSING
    _target_: Optional[str] = None


@dataclass
class DatasetConfig:
    name: str = choice("mnist", "fashion_mnist", "cifar10", "cifar100", "svhn", "imagefolder", "synthetic",
                       default=MISSING, trajectory=True)
    root: str = "data"
    download: bool = True
    check_md5: bool = True
    train_subset: Optional[int] = traj(None)   # use only the first N training examples
    val_size: int = traj(0)                    # training examples held out for validation (never the test set)
    crop_padding: int = traj(0)                # pixels of zero padding for random crops (0 = no crop)
    flip: bool = traj(False)
    mean: List[float] = traj(factory=lambda: [0.0])
    std: List[float] = traj(factory=lambda: [1.0])
    eps: Any = pixel()                         # the threat model's radius for this dataset
    pgd_alpha: Any = pixel()                   # the papers' PGD step size for this dataset
    pgd_steps: int = 10                        # the papers' PGD step count (methods copy these three: a resume
                                               # compares the method's copy)
    # synthetic only
    num_classes: Optional[int] = traj(None)
    shape: Optional[List[int]] = traj(None)    # [C, H, W]
    n_train: Optional[int] = traj(None)
    n_test: Optional[int] = None
    noise: Optional[float] = traj(None)
    # imagefolder only
    image_size: Optional[int] = traj(None)
    workers: Optional[int] = None


@dataclass
class ArchConfig:
    name: str = MISSING
    depth: Optional[int] = None
    widen_factor: Optional[int] = None
    dropout: float = 0.0


@dataclass
class OptimConfig:
    name: str = choice("sgd", "adam", default=MISSING)
    lr: float = 0.1                          # peak learning rate
    momentum: float = 0.9                    # sgd
    nesterov: bool = False                   # sgd
    weight_decay: float = 5e-4
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])  # adam
    impl: str = choice("auto", "fused", "foreach", "loop")  # parameter-update kernels


@dataclass
class ScheduleConfig:
    name: str = choice("constant", "piecewise", "cosine", "cyclic", default=MISSING)
    milestones: List[float] = in_range(0, 1, factory=lambda: [0.5, 0.75], what=FRACTION)  # piecewise
    gamma: float = 0.1                       # piecewise: LR factor at each milestone
    warmup: float = in_range(0, 1, 0.0, what=FRACTION)   # with a linear ramp from 0
    peak_at: float = in_range(0, 1, 0.4, what=FRACTION)  # cyclic: where the triangle peaks
    final_factor: float = in_range(0, 1, 0.0, what="the final LR as a fraction of the peak LR")  # cosine/cyclic


@dataclass
class TrainerConfig:
    epochs: int = traj(10)
    batch_size: int = traj(128)                # the GLOBAL batch, split over the devices
    devices: int = 1                         # processes (one per device) this command starts on this node
    sync_bn: bool = False                    # with several devices: BatchNorm statistics over the global batch
    accelerator: str = choice("auto", "cpu", "cuda")
    precision: str = choice("auto", "fp32", "bf16", "fp16")  # auto: bf16 on CUDA, fp32 on CPU; fp16 with loss scaling
    channels_last: str = choice("auto", "true", "false")     # auto: on CUDA
    eps_warmup: float = in_range(0, 1, 0.0, what=FRACTION, trajectory=True)  # over which eps and every attack
                                             # step size ramp up linearly from 0 (0: the full threat model at once)
    compile: bool = False
    compile_mode: str = choice("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
    deterministic: bool = False
    checkpoint_every: int = 1                # epochs between checkpoints; 0 = only at the end
    keep_checkpoints: int = 2                # epoch checkpoints kept beside last.pt (epoch_0007.pt, ...); 0 = none
    nan_check_every: int = 50                # steps between finiteness checks of the loss (each one syncs)
    progress: str = choice("auto", "bar", "lines", "off")    # auto: a bar on a terminal, lines otherwise
    log_every_s: float = 30.0                # seconds between plain progress lines


@dataclass
class EvalConfig:
    n: Optional[int] = None                  # test examples evaluated at the end (None = all)
    batch_size: int = 500
    every: int = 0                           # epochs between periodic evaluations (0 = only at the end)
    every_n: int = 1000                      # examples in each periodic evaluation
    seed: int = in_range(0, SEED_MAX, 0, what=SEED)  # the attacks' random starts: the same checkpoint, the same numbers


@dataclass
class LoggerConfig:
    name: str = choice("wandb", "none", default=MISSING)
    project: str = "advtrain"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    run_name: Optional[str] = None
    mode: str = choice("auto", "online", "offline", "disabled")  # auto: offline without credentials
    init_timeout_s: float = 15.0             # W&B unreachable this long at the start: the run logs offline instead


@dataclass
class AttackConfig:
    type: str = choice("pgd", "fgsm", "cw", "autoattack", default=MISSING)
    eps: Any = pixel()
    alpha: Any = pixel(None)                 # step size (pgd, cw)
    steps: int = 0
    restarts: int = 1
    norm: str = choice("linf", "l2")
    loss: str = choice("ce", "cw")
    version: str = "standard"                # autoattack
    seed: int = in_range(0, SEED_MAX, 0, what=SEED)  # autoattack
    attacks: Optional[List[str]] = None           # autoattack version=custom


# Sections every key of which shapes the training trajectory; the other sections mark their fields with traj().
WHOLE_TRAJECTORY = ("arch", "method", "optim", "schedule", "seed")


def trajectory_keys() -> tuple[str, ...]:
    """The config keys a checkpoint must agree on to resume into a run."""
    return WHOLE_TRAJECTORY + tuple(f"{section}.{f.name}" for section, schema in TRAIN_SECTIONS.items()
                                    for f in fields(schema) if f.metadata.get("trajectory"))


TRAIN_SECTIONS = {"dataset": DatasetConfig, "arch": ArchConfig, "optim": OptimConfig, "schedule": ScheduleConfig,
                  "trainer": TrainerConfig, "eval": EvalConfig, "logger": LoggerConfig}
