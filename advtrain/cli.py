"""Command-line entry points: `advtrain` (train), `advtrain-eval` (evaluate a checkpoint), `advtrain-report`.

    advtrain method=pgd dataset=cifar10 arch=preact_resnet18
    advtrain experiment=mnist_fgsm_rs_wong2020 dataset.root=/data logger=none
    advtrain -m method=pgd,fgsm_rs,trades seed=0,1,2
    advtrain-eval checkpoint=outputs/.../checkpoints/last.pt attack=[pgd50,autoattack] eval.n=1000

Hydra composes the config; every user error (config, data, checkpoint, NaN loss) ends in ONE line on stderr and
exit status 2, never a traceback; a run stopped by SIGTERM/SIGUSR1 exits with 128 + the signal number after writing
its checkpoint. ADVTRAIN_DEBUG=1 (or HYDRA_FULL_ERROR=1) shows the full traceback instead.
"""
from __future__ import annotations

import os
import sys
import traceback
from contextlib import contextmanager, nullcontext
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from advtrain.engine.rundir import RunDirBusy, discard_fresh_run_dir
from advtrain.engine.signals import StopWhileStarting
from advtrain.errors import UserError
from advtrain.hydra_errors import describe_hydra_error
from advtrain.sweep import register_resolvers

os.environ.setdefault("WANDB_SILENT", "true")
register_resolvers()  # before Hydra reads the config, which names them


def _one_line_errors(task):
    """Inside the job, so Hydra does not add its own report: user errors become one line and exit status 2."""

    def wrapped(cfg: DictConfig):
        from advtrain.engine.signals import Interrupted, StopNow

        try:
            return task(cfg)
        except Interrupted as e:
            print(f"{_program()}: {e}", file=sys.stderr)
            _where_the_sweep_stands()
            if e.chain is not None:  # submitit's handler: requeue the job, which resumes from the checkpoint
                e.chain(e.signum, None)
            sys.exit(128 + e.signum)
        except StopNow:  # a second Ctrl-C
            _exit("interrupted again: stopped at once, without a checkpoint of this moment (the last one stands; "
                  "rerun the command to continue from it)", 130)
        except UserError as e:
            _user_error(e)

    wrapped.__name__, wrapped.__doc__ = task.__name__, task.__doc__
    return wrapped


def _user_error(e: Exception):
    if _debug():
        raise e
    if not isinstance(e, RunDirBusy):  # that folder is another process's
        discard_fresh_run_dir()
    print(f"{_program()}: error: {e}", file=sys.stderr, flush=True)
    _where_the_sweep_stands()
    sys.exit(2)


def _where_the_sweep_stands() -> None:
    """A job that ends a sweep early: the sweep's folder and what it holds (on stdout, after the one-line error),
    as a sweep that ran to the end prints them, so the rerun that continues it is one command away."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    from advtrain.sweep_callback import job_states, summary_lines

    sweep_dir = Path(str(HydraConfig.get().sweep.dir))
    if job_states(sweep_dir):
        for line in summary_lines(sweep_dir):
            print(line, flush=True)
        print("rerun the same command to go on: finished jobs are skipped, interrupted ones resume", flush=True)


def _program() -> str:
    name = Path(sys.argv[0]).name
    return "advtrain" if name == "__main__.py" else name  # python -m advtrain


def _exit(message: str, status: int):
    print(f"{_program()}: {message}", file=sys.stderr)
    sys.exit(status)


def _debug() -> bool:
    return os.environ.get("ADVTRAIN_DEBUG") == "1"


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@_one_line_errors
def _train(cfg: DictConfig):
    from advtrain.config import check_config
    from advtrain.schema import TRAIN_SECTIONS
    from advtrain.sweep import claim_device, cpu_threads_per_job

    hydra_cfg = HydraConfig.get()
    checked = check_config(cfg, TRAIN_SECTIONS)
    from advtrain.engine.launch import run_training  # torch: only once the config is known to be good

    threads = cpu_threads_per_job()  # parallel jobs on one machine share its cores
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        with _holding(run_dir, cfg):
            # ... and each one-device job gets a GPU of its own (a multi-device job takes this node's first N).
            with claim_device() if checked.trainer.devices == 1 else nullcontext() as gpu:
                return run_training(checked, run_dir, hydra_cfg, device_index=gpu)
    except RunDirBusy as e:
        if hydra_cfg.mode != RunMode.MULTIRUN:
            raise
        print(f"{_program()}: skipped: {e}", file=sys.stderr)  # a rerun of a sweep that still runs: its job goes on
        return None


@contextmanager
def _holding(run_dir: Path, task_cfg: DictConfig):
    """The run directory is held by the process that writes it: this one, or rank 0 of a torchrun/srun group (the
    other ranks adopt rank 0's folder). The holder alone writes Hydra's record of the job there."""
    from advtrain.engine.distributed import external_world
    from advtrain.engine.rundir import exclusive, record_hydra_config

    world = external_world()
    if world is not None and world.rank != 0:
        yield
        return
    with exclusive(run_dir):
        record_hydra_config(run_dir, task_cfg)
        yield


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
@_one_line_errors
def _evaluate(cfg: DictConfig):
    from advtrain.config import check_eval_trainer
    from advtrain.engine.evaluate_checkpoint import evaluate_checkpoint
    from advtrain.errors import ConfigError

    if OmegaConf.is_missing(cfg, "checkpoint"):
        raise ConfigError("checkpoint= is required: the checkpoint to evaluate, e.g. advtrain-eval "
                          "checkpoint=outputs/.../checkpoints/last.pt")
    check_eval_trainer(cfg.trainer)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    with _holding(run_dir, cfg):  # a training run's folder, or another evaluation's, is refused in one line
        return evaluate_checkpoint(cfg, run_dir)


def _discard_a_fresh_run_dir() -> None:
    if HydraConfig.initialized():
        discard_fresh_run_dir()


def _run(entry) -> None:
    debug = _debug() or os.environ.get("HYDRA_FULL_ERROR") == "1"
    # Composition errors then reach us instead of Hydra's multi-line report, so each becomes one line.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    StopWhileStarting.install(_program(), cleanup=_discard_a_fresh_run_dir)
    try:
        entry()
    except KeyboardInterrupt:  # Ctrl-C before the run started (composing the config, importing)
        _exit("interrupted", 130)
    except BrokenPipeError:  # `advtrain --help | head`: the reader has gone, nothing is left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
    except Exception as e:
        message = describe_hydra_error(e) or _run_dir_error(e)
        if debug or message is None:
            raise
        _exit(f"error: {message}", 2)


def _run_dir_error(e: Exception) -> str | None:
    """Hydra makes the run directory before the job starts; an OSError from there is the user's folder choice."""
    if not isinstance(e, OSError) or not any(frame.name == "run_job" for frame in traceback.extract_tb(e.__traceback__)):
        return None
    if any(frame.name == "wrapped" for frame in traceback.extract_tb(e.__traceback__)):
        return None  # raised inside the job itself
    return (f"cannot create the run directory {e.filename}: {e.strerror} (choose a writable folder with "
            "hydra.run.dir=..., or hydra.sweep.dir=... for -m)")


def train() -> None:
    _run(_train)


def evaluate() -> None:
    _run(_evaluate)


def report() -> None:
    from advtrain.report import main

    main(sys.argv[1:])
