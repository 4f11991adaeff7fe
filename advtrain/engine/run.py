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

from advtrain.config import check_eval_n
from advtrain.data import Data, build_data
from advtrain.engine.checkpoint import Checkpoint, RunCheckpoints
from advtrain.engine.context import TrainContext
from advtrain.engine.distributed import SINGLE, Dist, rank_seed, sync_buffers
from advtrain.engine.evaluate import RunEvaluation, flat
from advtrain.engine.finish import final_evaluation, record_results
from advtrain.engine.loop import LoopSettings, LoopState, run_epochs
from advtrain.engine.network import build_network, model_from_checkpoint, model_spec
from advtrain.engine.optim import build_optimizer
from advtrain.engine.precision import Runtime, resolve_runtime, seed_everything
from advtrain.engine.results import build_results, view_flops
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
    ckpts = RunCheckpoints(run_dir, dist, keep=cfg.trainer.keep_checkpoints)
    with stop_at_once(run_dir, lambda: ckpts.newest) as stops:
        return _train(cfg, dist, device_index, stops, ckpts)


def _train(cfg, dist: Dist, device_index: int, stops, ckpts: RunCheckpoints) -> dict[str, Any]:
    rt = resolve_runtime(cfg.trainer, dist.local_rank if dist.enabled else device_index)
    seed_everything(rank_seed(cfg.seed, dist.rank), cfg.trainer.deterministic)
    con.console.quiet = not dist.is_main  # rank 0 alone prints, logs and writes files
    for tmp in ckpts.remove_stale():
        con.console.print(f"removed {tmp.name}, left by a write that was interrupted", markup=False)
    resume_state = ckpts.resume_state(cfg, say=lambda line: con.console.print(line, markup=False))
    done = ckpts.finished(resume_state, cfg)
    if done is not None:
        con.console.print(f"already finished: {ckpts.results_path} (resume=never starts over)")
        return done
    parts = build_parts(cfg, rt, dist)
    check_eval_n(cfg.eval.n, parts.data.test.n_examples, cfg.dataset.name)  # imagefolder's size is known only now
    config_yaml = OmegaConf.to_yaml(cfg)
    con.print_config(config_yaml)
    counter, state = PassCounter(), LoopState()
    ctx = build_context(cfg, parts, counter, dist)
    ckpts.bind(model=parts.model, optimizer=parts.optimizer, scaler=rt.scaler, method=parts.method,
               loader=parts.data.train, counter=counter, ctx=ctx, config=config_yaml, spec=parts.spec)
    if resume_state is not None:
        ckpts.restore(resume_state, state)
        con.console.print(f"resumed from {ckpts.resumed_from} at epoch {state.epoch + 1}, batch {state.batch}")
    ctx.stop_reason = state.stop_reason
    parts.method.setup(ctx)
    evaluation = RunEvaluation(cfg, parts.method, parts.data, dist)
    logger = build_logger(cfg.logger, OmegaConf.to_container(cfg), ckpts.run_dir) if dist.is_main else NullLogger()
    exit_code = 1
    try:
        if not state.finished:
            train_epochs(cfg, ctx, parts, state, ckpts, evaluation, logger)
        sync_buffers(parts.model, dist)
        scores, warnings = final_evaluation(parts.model, parts.data.test, evaluation.suite, cfg.eval,
                                            parts.method.eval_views(), ckpts=ckpts, stops=stops,
                                            what="final evaluation", dist=dist, progress=cfg.trainer.progress,
                                            log_every_s=cfg.trainer.log_every_s)
        (passes,) = dist.sum([counter.total])
        results = build_results(cfg, state, passes, parts.data.train.n_examples, scores, rt,
                                checkpoint=str(ckpts.last_path), world_size=dist.world_size, warnings=warnings,
                                companions=parts.companion_records, flops=view_flops(parts.method.eval_views()))
        record_results(results, ckpts, dist)
        logged = flat(scores)
        logger.log({**{f"eval/{k}": v for k, v in logged.items() if k.rpartition("/")[2] != "n"},
                    "train_time_s": state.train_time_s})
        logger.summary({"train_time_s": state.train_time_s, "passes_per_example": results["passes_per_example"],
                        **{f"final/{k}": v for k, v in logged.items()}})
        exit_code = 0
        return results
    finally:
        logger.finish(exit_code)


def train_epochs(cfg, ctx: TrainContext, parts: "Parts", state: LoopState, ckpts: RunCheckpoints,
                 evaluation: RunEvaluation, logger) -> None:
    """The training loop from `state` to the end, with its progress display, epoch records and checkpoints."""
    dist = ctx.dist
    progress = con.TrainProgress(cfg.trainer.epochs, len(parts.data.train),
                                 cfg.trainer.progress if dist.is_main else "off", cfg.trainer.log_every_s)

    def on_epoch(record: dict) -> None:
        logger.log(record)
        shown = {k: v for k, v in record.items() if k != "epoch"}
        progress.print(f"epoch {record['epoch']}/{cfg.trainer.epochs}  " + con.metrics_text(shown))

    def periodic_eval() -> dict:
        sync_buffers(parts.model, dist)
        return evaluation.periodic(ctx.attack_model, state, lambda: ckpts.save(state, ckpts.best_path))

    run_epochs(ctx, parts.method, parts.data.train, LoopSettings.of(cfg), state, progress=progress, save=ckpts.save,
               on_epoch=on_epoch, periodic_eval=periodic_eval if cfg.eval.every else None)


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
        state = Checkpoint.load(path)
        _, model = model_from_checkpoint(state)
    except CheckpointError as e:
        raise CheckpointError(f"the method's {name} model: {e}") from None
    if not state.loop.get("finished", True):
        # A sweep that trains the teacher beside its students must not hand a student a half-trained one.
        raise CheckpointError(f"the method's {name} model {path} is from a run that has not finished training "
                              f"(it stands at epoch {state.loop.get('epoch', 0)}): finish that run, then rerun this one")
    spec = state.model_spec
    if tuple(spec["shape"]) != tuple(info.shape) or spec["num_classes"] != info.num_classes:
        raise CheckpointError(f"the method's {name} model {path} was trained on {spec['dataset']} images of shape "
                              f"{tuple(spec['shape'])} with {spec['num_classes']} classes; this run's {info.name} "
                              f"has {tuple(info.shape)} and {info.num_classes}")
    return model.to(device).eval().requires_grad_(False), spec, float(state.loop.get("train_time_s", 0.0))


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
