"""One training run, start to finish: build, resume, train, evaluate, write results.json.

Everything a run writes lives in its run directory: checkpoints/last.pt, results.json, and the W&B files.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from advtrain.data import Data, build_data
from advtrain.engine.atomic import is_disk_full, remove_stale_temps
from advtrain.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from advtrain.engine.context import TrainContext
from advtrain.engine.distributed import SINGLE, Dist, rank_seed
from advtrain.engine.evaluate import evaluate_views, flat, periodic_suite
from advtrain.engine.loop import LoopState, run_epochs
from advtrain.engine.network import build_network, model_from_checkpoint, model_spec
from advtrain.engine.optim import build_optimizer
from advtrain.engine.precision import Runtime, resolve_runtime, rng_state, seed_everything, set_rng_state
from advtrain.engine.results import attack_suite, build_results, eval_settings, write_results
from advtrain.engine.signals import stop_at_once
from advtrain.errors import ConfigError
from advtrain.attacks import PassCounter
from advtrain.logging import console as con
from advtrain.logging.wandb_logger import NullLogger, build_logger
from advtrain.methods import build_method
from advtrain.methods.base import Method
from advtrain.schema import trajectory_keys

class LastCheckpoint:
    """The newest checkpoint on disk, described for the messages of a failed write or a stop outside the loop."""

    def __init__(self):
        self.text: str | None = None

    def record(self, path: Path, loop: dict) -> None:
        where = (f"epoch {loop['epoch'] + 1}, batch {loop['batch']}" if loop["batch"] else
                 f"after epoch {loop['epoch']}")
        self.text = f"{path} ({'finished' if loop.get('finished') else where})"


def train(cfg, run_dir: Path, dist: Dist = SINGLE, device_index: int = 0) -> dict[str, Any]:
    """Train and evaluate on this process's device; with several ranks every rank calls this (see distributed.py).
    device_index: the CUDA device of a one-process run; a rank uses the one of its local rank. The caller holds
    the run directory (advtrain.engine.rundir), so nothing else writes there meanwhile."""
    last = LastCheckpoint()
    with stop_at_once(run_dir, lambda: last.text) as stops:
        return _train(cfg, run_dir, dist, device_index, stops, last)


def _train(cfg, run_dir: Path, dist: Dist, device_index: int, stops, last: LastCheckpoint) -> dict[str, Any]:
    rt = resolve_runtime(cfg.trainer, dist.local_rank if dist.enabled else device_index)
    seed_everything(rank_seed(cfg.seed, dist.rank), cfg.trainer.deterministic)
    con.console.quiet = not dist.is_main  # rank 0 alone prints, logs and writes files
    ckpt_path = run_dir / "checkpoints" / "last.pt"
    results_path = run_dir / "results.json"
    if dist.is_main:
        for tmp in remove_stale_temps(run_dir, ckpt_path.parent):
            con.console.print(f"removed {tmp.name}, left by a write that was interrupted", markup=False)
    resume_state = _resume_state(cfg, ckpt_path, dist.world_size)
    if resume_state is not None:
        last.record(Path(cfg.resume if cfg.resume != "auto" else ckpt_path), resume_state["loop"])
    if resume_state is not None and resume_state["loop"]["finished"] and _evaluated(results_path, cfg):
        con.console.print(f"already finished: {results_path} (resume=never starts over)")
        return json.loads(results_path.read_text())
    parts = build_parts(cfg, rt, dist)
    data, method, spec, model, optimizer = parts.data, parts.method, parts.spec, parts.model, parts.optimizer
    config_yaml = OmegaConf.to_yaml(cfg)
    con.print_config(config_yaml)
    counter = PassCounter()
    state = LoopState()
    if resume_state is not None:
        _restore(resume_state, model, optimizer, rt.scaler, method, data.train, counter, state, dist.rank)
        con.console.print(f"resumed from {cfg.resume if cfg.resume != 'auto' else ckpt_path} at epoch "
                          f"{state.epoch + 1}, batch {state.batch}")
    ctx = build_context(cfg, parts, counter, dist)
    ctx.stop_reason = state.stop_reason
    ctx.updates = resume_state["updates"] if resume_state is not None else 0
    method.setup(ctx)

    def save(loop_state: LoopState, path: Path = ckpt_path) -> str:
        # Every rank takes part: per-rank state (RNG, method buffers, pass counts) is gathered to rank 0.
        sync_buffers(model, dist)
        mine = to_cpu({"method": method.state_dict(), "rng": rng_state(), "counter": counter.state_dict()})
        ranks = dist.gather(mine)
        if dist.is_main:
            checkpoint = {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": rt.scaler.state_dict() if rt.scaler is not None else None,
                "method": mine["method"], "loader": data.train.state_dict(), "rng": mine["rng"],
                "counter": {"total": sum(r["counter"]["total"] for r in ranks)}, "updates": ctx.updates,
                "loop": vars(loop_state).copy(), "config": config_yaml, "model_spec": spec,
                "world_size": dist.world_size, "ranks": ranks if dist.enabled else None,
                # Where the frozen companion models came from; they are the method's inputs, not its state.
                "companions": dict(method.companions()),
            }
            with _reporting_full_disk(path, last):
                save_checkpoint(checkpoint, path)
            if path == ckpt_path:
                last.record(path, checkpoint["loop"])
        dist.barrier()  # no rank moves on (or exits) before the checkpoint is on disk
        return str(path)

    monitor_set = data.val if data.val is not None else data.test
    suite = attack_suite(cfg)

    def periodic_eval() -> dict:
        sync_buffers(model, dist)
        scores = evaluate_views(ctx.attack_model, monitor_set, periodic_suite(suite), n=cfg.eval.every_n,
                                batch_size=cfg.eval.batch_size, seed=cfg.eval.seed, views=method.eval_views(),
                                dist=dist)
        # Model selection on the held-out split only (never on the test set): keep the most robust weights, by the
        # number the method says matters (its first view's first attack unless it says otherwise).
        if data.val is not None:
            score = method.select_score(scores)
            if state.best_val_score is None or score > state.best_val_score:
                state.best_val_score = score
                save(state, ckpt_path.with_name("best.pt"))
        return flat(scores)

    logger = build_logger(cfg.logger, OmegaConf.to_container(cfg), run_dir) if dist.is_main else NullLogger()
    exit_code = 1
    try:
        if not state.finished:
            progress = con.TrainProgress(cfg.trainer.epochs, len(data.train),
                                         cfg.trainer.progress if dist.is_main else "off", cfg.trainer.log_every_s)

            def on_epoch(record: dict) -> None:
                logger.log(record)
                shown = {k: v for k, v in record.items() if k != "epoch"}
                progress.print(f"epoch {record['epoch']}/{cfg.trainer.epochs}  " +
                               "  ".join(f"{k} {v:.4g}" for k, v in shown.items()))

            run_epochs(ctx, method, data.train, cfg, state, progress=progress, save=save, on_epoch=on_epoch,
                       periodic_eval=periodic_eval if cfg.eval.every else None)
        stops.phase = "during the final evaluation"
        con.console.print(f"final evaluation on {cfg.eval.n or data.test.n_examples} test examples: "
                          f"clean, {', '.join(suite) or 'no attacks'}")
        sync_buffers(model, dist)
        warnings: list[str] = []
        scores = evaluate_views(model, data.test, suite, n=cfg.eval.n, batch_size=cfg.eval.batch_size,
                                seed=cfg.eval.seed, views=method.eval_views(), dist=dist, warnings=warnings,
                                on_progress=lambda line: con.console.print(line, markup=False))
        (passes,) = dist.sum([counter.total])
        results = build_results(cfg, state, passes, data.train.n_examples, scores, rt,
                                checkpoint=str(ckpt_path), world_size=dist.world_size, warnings=warnings)
        if dist.is_main:
            with _reporting_full_disk(results_path, last):
                write_results(results, results_path)
        logged = flat(scores)
        logger.log({**{f"eval/{k}": v for k, v in logged.items() if k.rpartition("/")[2] != "n"},
                    "train_time_s": state.train_time_s})
        logger.summary({"train_time_s": state.train_time_s, "passes_per_example": results["passes_per_example"],
                        **{f"final/{k}": v for k, v in logged.items()}})
        con.print_results(results)
        con.console.print(f"results: {results_path}")
        exit_code = 0
        return results
    finally:
        logger.finish(exit_code)


@contextmanager
def _reporting_full_disk(path: Path, last: LastCheckpoint):
    """A full disk is the user's to fix: one line that says so and what is kept, not torch's zip-writer traceback."""
    try:
        yield
    except Exception as e:
        if not is_disk_full(e):
            raise
        kept = f"the checkpoint {last.text} is kept" if last.text else "no earlier checkpoint exists"
        raise CheckpointError(f"no space left on device writing {path}; {kept}") from None


@dataclass
class Parts:
    """What a run trains: built once per process, before any checkpoint is restored into it."""
    rt: Runtime
    data: Data
    method: Method
    spec: dict                        # what load_model needs to rebuild the network
    model: nn.Module                  # the plain module (channels_last / SyncBN applied)
    optimizer: torch.optim.Optimizer
    companions: dict                  # name -> the frozen models the method needs (never trained, never saved)


def build_parts(cfg, rt: Runtime, dist: Dist = SINGLE) -> Parts:
    data = build_data(cfg.dataset, device=rt.device, seed=cfg.seed, batch_size=cfg.trainer.batch_size,
                      rank=dist.rank, world_size=dist.world_size)
    method = build_method(cfg.method, data.info)
    if cfg.trainer.compile and not method.compilable:
        raise ConfigError(f"method={cfg.method.name} cannot run under torch.compile (its training step changes the "
                          "model in ways a compiled graph would not follow): leave trainer.compile=false")
    companions = {name: load_companion(name, path, rt.device) for name, path in method.companions().items()}
    spec = model_spec(cfg, data.info)
    model = build_network(spec, method).to(rt.device)
    if dist.enabled and cfg.trainer.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg.optim, model.parameters())
    return Parts(rt, data, method, spec, model, optimizer, companions)


def load_companion(name: str, path: str, device: torch.device) -> nn.Module:
    """A frozen model from an advtrain checkpoint (weights_only): on the device, in eval mode, without gradients."""
    try:
        _, model = model_from_checkpoint(load_checkpoint(path))
    except CheckpointError as e:
        raise CheckpointError(f"the method's {name} model: {e}") from None
    return model.to(device).eval().requires_grad_(False)


def build_context(cfg, parts: Parts, counter: PassCounter, dist: Dist = SINGLE) -> TrainContext:
    """The model as the method sees it: compiled if asked; updates through DDP with several ranks, while attacks run
    on the plain module (input-only gradients, so no gradient all-reduce per attack step)."""
    model, rt = parts.model, parts.rt
    trainer = cfg.trainer

    def compiled(module: nn.Module) -> nn.Module:
        # reduce-overhead adds CUDA graphs: it pays where kernel launches, not FLOPs, bound the step.
        return torch.compile(module, mode=trainer.compile_mode) if trainer.compile else module

    attack_model = update_model = compiled(model)
    if dist.enabled:
        ddp = DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None,
                                      find_unused_parameters=parts.method.find_unused_parameters)
        update_model = compiled(ddp)
    return TrainContext(model=update_model, attack_model=attack_model, optimizer=parts.optimizer, scaler=rt.scaler,
                        counter=counter, device=rt.device, autocast=rt.autocast, epochs=cfg.trainer.epochs,
                        batches_per_epoch=len(parts.data.train), fixed_batch=parts.data.train.fixed_batch, dist=dist,
                        companions=parts.companions)


def _evaluated(results_path: Path, cfg) -> bool:
    """Whether results.json holds the final evaluation this config asks for."""
    try:
        settings = json.loads(results_path.read_text()).get("eval_settings")
    except (OSError, ValueError):
        return False
    return settings == eval_settings(cfg)


def sync_buffers(model: nn.Module, dist: Dist) -> None:
    """Give every rank rank 0's buffers (BN running statistics, which each rank updates from its own shard), so that
    evaluation shards and checkpoints see one model."""
    if dist.enabled:
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, src=0)


def to_cpu(obj):
    """A copy of nested containers with every tensor moved to the CPU (to be pickled between ranks)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def _resume_state(cfg, ckpt_path: Path, world_size: int) -> dict | None:
    if cfg.resume in (None, "never"):
        return None
    path = ckpt_path if cfg.resume == "auto" else Path(cfg.resume)
    if cfg.resume == "auto" and not path.exists():
        return None
    try:
        state = load_checkpoint(path)
    except CheckpointError as e:
        if cfg.resume != "auto":
            raise
        raise CheckpointError(f"{e}; to start this run over instead, rerun with resume=never (its checkpoint is "
                              "then replaced)") from None
    written_by = int(state.get("world_size", 1))
    if written_by != world_size and not state["loop"]["finished"]:
        # Each rank's RNG stream and method state (FREE's perturbations, ...) belong to its shard of the data.
        raise CheckpointError(f"cannot resume from {path}: it was written by {written_by} process(es), this run has "
                              f"{world_size}; resume with trainer.devices={written_by}")
    saved = OmegaConf.create(state["config"])
    for key in trajectory_keys():  # the schema marks them: a checkpoint resumes only where they all agree
        ours, theirs = OmegaConf.select(cfg, key), OmegaConf.select(saved, key)
        if _plain(ours) != _plain(theirs):
            raise CheckpointError(f"cannot resume from {path}: it was trained with {key}={_plain(theirs)}, this run "
                                  f"has {key}={_plain(ours)}; use a new run directory or resume=never")
    return state


def _plain(value):
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def _restore(state, model, optimizer, scaler, method, loader, counter, loop: LoopState, rank: int) -> None:
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint does not match this model: {str(e).splitlines()[0][:200]}") from None
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    ranks = state.get("ranks") or []
    mine = ranks[rank] if rank < len(ranks) else state  # a finished run re-evaluated on another world size
    method.load_state_dict(mine["method"])
    loader.load_state_dict(state["loader"])
    counter.load_state_dict(mine["counter"])
    for k, v in state["loop"].items():
        setattr(loop, k, v)
    set_rng_state(mine["rng"])
