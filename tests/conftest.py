"""Shared test helpers: tiny configs composed and checked in-process, a method context around any model, a thread
limit that restores itself, running the CLI in a subprocess, locating real data."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

# Under pytest-xdist (the README's `-n 2`) every worker, and every advtrain it starts, keeps to one intra-op thread:
# two workers with a thread per core each would leave OpenMP threads spin-waiting for cores the other one holds.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

REPO = Path(__file__).resolve().parents[1]
# Real MNIST / Fashion-MNIST in torchvision's layout: $ADVTRAIN_DATA (the folder advtrain's dataset.root defaults to),
# else ../shared/data beside the checkout; tests that need them skip where neither holds them.
SHARED_DATA = Path(os.environ.get("ADVTRAIN_DATA", REPO.parent / "shared" / "data"))

# Small, fast, deterministic settings for end-to-end runs on synthetic data.
TINY = ["dataset=synthetic", "arch=mnist_net", "logger=none", "trainer.epochs=2", "trainer.batch_size=64",
        "dataset.n_train=512", "dataset.n_test=128", "attack=[pgd20]", "trainer.progress=lines"]


# In-process runs on synthetic data (extend with a module's own sizes and method).
SYNTH = ["dataset=synthetic", "arch=mnist_net", "logger=none", "trainer.progress=off", "dataset.n_test=64",
         "attack=[]"]


def compose_train(overrides: list[str]):
    with initialize_config_module(config_module="advtrain.conf", version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def checked(overrides: list[str]):
    """The composed and checked config, as `advtrain` would run it."""
    from advtrain.config import check_config
    from advtrain.schema import TRAIN_SECTIONS

    return check_config(compose_train(overrides), TRAIN_SECTIONS)


def make_context(model, *, batch=None, scaler=None, autocast=None, lr: float = 0.1):
    """A TrainContext around a plain model: SGD, CPU, one epoch of one batch (`batch`: what fixed_batch returns)."""
    import torch

    from advtrain.attacks import PassCounter
    from advtrain.engine.context import TrainContext

    return TrainContext(model=model, attack_model=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr),
                        scaler=scaler, counter=PassCounter(), device=torch.device("cpu"),
                        autocast=autocast or (lambda: torch.autocast("cpu", enabled=False)), epochs=1,
                        batches_per_epoch=1, fixed_batch=(lambda n: batch) if batch is not None else None)


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from intra-op threads, and OpenMP threads spin-waiting for a core another process
    holds make them many times slower on a busy 2-core machine; the previous setting comes back afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_cli(args: list[str], cwd: Path, program: str = "advtrain", timeout: float = 300, env=None):
    """Run an entry point as a user would; returns the CompletedProcess (text mode). env values of None unset."""
    # WANDB_SERVICE: a W&B service this test process started (an in-process W&B test) is not the CLI's to share,
    # unless a test passes it on purpose.
    inherited = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    full_env = {**inherited, "WANDB_MODE": "offline", "WANDB_SILENT": "true", **(env or {})}
    for key in ("HYDRA_FULL_ERROR", "ADVTRAIN_DEBUG", *[k for k, v in (env or {}).items() if v is None]):
        full_env.pop(key, None)
    return subprocess.run([program, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env,
                          stdin=subprocess.DEVNULL)


def interrupt_after(args: list[str], cwd: Path, marker: str, signum: int = signal.SIGTERM,
                    program: str = "advtrain") -> subprocess.CompletedProcess:
    """Start a run, send `signum` once `marker` appears on stdout, return what it printed and its status."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline"}
    proc = subprocess.Popen([program, *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    seen = []
    deadline = time.time() + 240
    for line in proc.stdout:
        seen.append(line)
        if marker in line:
            proc.send_signal(signum)
            break
        assert time.time() < deadline, "the run never printed " + marker
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, "".join(seen) + out, err)


@pytest.fixture
def mnist_root() -> Path:
    if not (SHARED_DATA / "MNIST" / "raw").is_dir():
        pytest.skip(f"real MNIST not found under {SHARED_DATA}")
    return SHARED_DATA

