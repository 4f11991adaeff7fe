"""One training run, start to finish: build, resume, train, evaluate, write results.json.

Everything a run writes lives in its run directory: checkpoints/last.pt, results.json, and the W&B files.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from advtrain.data import Data, build_data
from advtrain.engine.checkpoint import load_checkpoint
from advtrain.engine.checkpointing import Checkpoints
from advtrain.engine.context import TrainContext
from advtrain.engine.distributed import SINGLE, Dist, rank_seed
from advtrain.engine.eval_progress import progress_path
from advtrain.engine.evaluate import RunEvaluation, flat
from advtrain.engine.loop import LoopState, run_epochs
from advtrain.engine.network import build_network, model_from_checkpoint, model_spec
from advtrain.engine.optim import build_optimizer
from advtrain.engine.precision import Runtime, resolve_runtime, rng_state, seed_everything
from advtrain.engine.results import build_results, view_flops, write_results
from advtrain.engine.signals import stop_at_once
from advtrain.errors import CheckpointError, ConfigError
from advtrain.attacks import PassCounter
from advtrain.logging import console as con
from advtrain.logging.wandb_logger import NullLogger, build_logger
from advtrain.methods import build_method
from advtrain.methods.base import Method

def train(cfg, run_dir: Path, dist: Dist = SINGLE, device_index: int = 0) -> dict[str, Any]:
    """Train and evaluate on this process's device; with several ranks every rank calls this (see distributed.py).
    device_index: the CUDA device of a one-process run; a rank uses the one of its local rank. The caller holds
    the run directory (advtrain.engine.rundir), so nothing else writes there meanwhile."""
    ckpts = Checkpoints(run_dir, dist)
    with stop_at_once(run_dir, lambda: ckpts.newest) as stops:
        return _train(cfg, dist, device_index, stops, ckpts)


def _train(cfg, dist: Dist, device_index: int, stops, ckpts: Checkpoints) -> dict[str, Any]:
    rt = resolve_runtime(cfg.trainer, dist.local_rank if dist.enabled else device_index)
    seed_everything(rank_seed(cfg.seed, dist.rank), cfg.trainer.deterministic)
    con.console.quiet = not dist.is_main  # rank 0 alone prints, logs and writes files
    for tmp in ckpts.remove_stale():
        con.console.print(f"removed {tmp.name}, left by a write that was interrupted", markup=False)
    resume_state = ckpts.resume_state(cfg)
    done = ckpts.finished(resume_state, cfg)
    if done is not None:
        con.console.print(f"already finished: {ckpts.results_path} (resume=never starts over)")
        return done
    parts = build_parts(cfg, rt, dist)
    data, method, model = parts.data, parts.method, parts.model
    config_yaml = OmegaConf.to_yaml(cfg)
    con.print_config(config_yaml)
    counter = PassCounter()
    state = LoopState()
    if resume_state is not None:
        ckpts.restore(resume_state, model, parts.optimizer, rt.scaler, method, data.train, counter, state, dist.rank)
        con.console.print(f"resumed from {cfg.resume if cfg.resume != 'auto' else ckpts.last_path} at epoch "
                          f"{state.epoch + 1}, batch {state.batch}")
    ctx = build_context(cfg, parts, counter, dist)
    ctx.stop_reason = state.stop_reason
    ctx.updates = resume_state["updates"] if resume_state is not None else 0
    method.setup(ctx)

    def own_state() -> dict:  # this rank's: gathered to rank 0 into the checkpoint
        return to_cpu({"method": method.state_dict(), "rng": rng_state(), "counter": counter.state_dict()})

    def checkpoint(loop: LoopState, ranks: list) -> dict:
        mine = ranks[0]
        return {
            "model": model.state_dict(), "optimizer": parts.optimizer.state_dict(),
            "scaler": rt.scaler.state_dict() if rt.scaler is not None else None,
            "method": mine["method"], "loader": data.train.state_dict(), "rng": mine["rng"],
            "counter": {"total": sum(r["counter"]["total"] for r in ranks)}, "updates": ctx.updates,
            "loop": vars(loop).copy(), "config": config_yaml, "model_spec": parts.spec,
            "world_size": dist.world_size, "ranks": ranks if dist.enabled else None,
            # Where the frozen companion models came from; they are the method's inputs, not its state.
            "companions": dict(method.companions()),
        }

    def save(loop: LoopState, path: Path | None = None) -> str:
        sync_buffers(model, dist)
        return ckpts.save(loop, own_state, checkpoint, path)

    evaluation = RunEvaluation(cfg, method, data, dist)

    def periodic_eval() -> dict:
        sync_buffers(model, dist)
        return evaluation.periodic(ctx.attack_model, state, lambda: save(state, ckpts.best_path))

    logger = build_logger(cfg.logger, OmegaConf.to_container(cfg), ckpts.run_dir) if dist.is_main else NullLogger()
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
        progress_file = progress_path(ckpts.run_dir, dist.rank, dist.world_size)
        stops.phase = f"during the final evaluation (its progress is kept in {progress_file.name})"
        con.console.print(f"final evaluation on {cfg.eval.n or data.test.n_examples} test examples: "
                          f"clean, {', '.join(evaluation.suite) or 'no attacks'}")
        sync_buffers(model, dist)
        scores, warnings = evaluation.final(model, on_progress=lambda line: con.console.print(line, markup=False),
                                            progress_file=progress_file)
        (passes,) = dist.sum([counter.total])
        results = build_results(cfg, state, passes, data.train.n_examples, scores, rt,
                                checkpoint=str(ckpts.last_path), world_size=dist.world_size, warnings=warnings,
                                companions=parts.companion_records, flops=view_flops(method.eval_views()))
        if dist.is_main:
            with ckpts.reporting_full_disk(ckpts.results_path):
                write_results(results, ckpts.results_path)
        progress_file.unlink(missing_ok=True)  # its numbers are in results.json (on rank 0, summed over ranks)
        logged = flat(scores)
        logger.log({**{f"eval/{k}": v for k, v in logged.items() if k.rpartition("/")[2] != "n"},
                    "train_time_s": state.train_time_s})
        logger.summary({"train_time_s": state.train_time_s, "passes_per_example": results["passes_per_example"],
                        **{f"final/{k}": v for k, v in logged.items()}})
        con.print_results(results)
        con.console.print(f"results: {ckpts.results_path}")
        exit_code = 0
        return results
    finally:
        logger.finish(exit_code)


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
    companion_records: dict           # name -> {"checkpoint", "train_time_s"}: where each came from, what it cost


def build_parts(cfg, rt: Runtime, dist: Dist = SINGLE) -> Parts:
    data = build_data(cfg.dataset, device=rt.device, seed=cfg.seed, batch_size=cfg.trainer.batch_size,
                      rank=dist.rank, world_size=dist.world_size)
    method = build_method(cfg.method, data.info)
    if cfg.trainer.compile and not method.compilable:
        raise ConfigError(f"method={cfg.method.name} cannot run under torch.compile (its training step changes the "
                          "model in ways a compiled graph would not follow): leave trainer.compile=false")
    loaded = {name: load_companion(name, path, data.info, rt.device) for name, path in method.companions().items()}
    companions = {name: model for name, (model, _, _) in loaded.items()}
    spec = model_spec(cfg, data.info, {name: s for name, (_, s, _) in loaded.items()})
    model = build_network(spec, method, companions).to(rt.device)
    if dist.enabled and cfg.trainer.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg.optim, model.parameters())
    records = {name: {"checkpoint": str(method.companions()[name]), "train_time_s": t}
               for name, (_, _, t) in loaded.items()}
    return Parts(rt, data, method, spec, model, optimizer, companions, records)


def load_companion(name: str, path: str, info, device: torch.device) -> tuple[nn.Module, dict, float]:
    """(model, its spec, the seconds it took to train) from an advtrain checkpoint (weights_only): on the device,
    in eval mode, without gradients. It must take this run's images: the same shape and classes."""
    try:
        state = load_checkpoint(path)
        _, model = model_from_checkpoint(state)
    except CheckpointError as e:
        raise CheckpointError(f"the method's {name} model: {e}") from None
    spec = state["model_spec"]
    if tuple(spec["shape"]) != tuple(info.shape) or spec["num_classes"] != info.num_classes:
        raise CheckpointError(f"the method's {name} model {path} was trained on {spec['dataset']} images of shape "
                              f"{tuple(spec['shape'])} with {spec['num_classes']} classes; this run's {info.name} "
                              f"has {tuple(info.shape)} and {info.num_classes}")
    return model.to(device).eval().requires_grad_(False), spec, float(state["loop"].get("train_time_s", 0.0))


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


