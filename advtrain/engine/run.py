"""One training run, start to finish: build, resume, train, evaluate, write results.json.

Everything a run writes lives in its run directory: checkpoints/last.pt, results.json, and the W&B files.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from advtrain.data import build_data
from advtrain.engine.checkpoint import (CheckpointError, build_network, load_checkpoint, model_spec,
                                       save_checkpoint)
from advtrain.engine.context import TrainContext
from advtrain.engine.evaluate import evaluate, periodic_suite
from advtrain.engine.loop import LoopState, run_epochs
from advtrain.engine.optim import build_optimizer
from advtrain.engine.precision import resolve_runtime, rng_state, seed_everything, set_rng_state
from advtrain.engine.results import build_results, write_results
from advtrain.attacks import PassCounter
from advtrain.logging import console as con
from advtrain.logging.wandb_logger import build_logger
from advtrain.methods import build_method

# Config keys that shape the training trajectory: a checkpoint resumes only into a run that agrees on all of them.
TRAJECTORY_KEYS = ("arch", "method", "optim", "schedule", "seed", "trainer.epochs", "trainer.batch_size",
                   "dataset.name", "dataset.train_subset", "dataset.val_size", "dataset.crop_padding",
                   "dataset.flip", "dataset.mean", "dataset.std", "dataset.shape", "dataset.num_classes",
                   "dataset.n_train", "dataset.noise")


def train(cfg, run_dir: Path) -> dict[str, Any]:
    rt = resolve_runtime(cfg.trainer)
    seed_everything(cfg.seed, cfg.trainer.deterministic)
    ckpt_path = run_dir / "checkpoints" / "last.pt"
    resume_state = _resume_state(cfg, ckpt_path)
    results_path = run_dir / "results.json"
    data = build_data(cfg.dataset, device=rt.device, seed=cfg.seed, batch_size=cfg.trainer.batch_size)
    method = build_method(cfg.method, data.info)
    spec = model_spec(cfg, data.info)
    model = build_network(spec, method).to(rt.device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg.optim, model.parameters())
    config_yaml = OmegaConf.to_yaml(cfg)
    con.print_config(config_yaml)
    counter = PassCounter()
    state = LoopState()
    if resume_state is not None:
        _restore(resume_state, model, optimizer, rt.scaler, method, data.train, counter, state)
        con.console.print(f"resumed from {cfg.resume if cfg.resume != 'auto' else ckpt_path} at epoch "
                          f"{state.epoch + 1}, batch {state.batch}")
    run_model = torch.compile(model) if cfg.trainer.compile else model
    ctx = TrainContext(model=run_model, attack_model=run_model, optimizer=optimizer, scaler=rt.scaler,
                       counter=counter, device=rt.device, autocast=rt.autocast, epochs=cfg.trainer.epochs,
                       batches_per_epoch=len(data.train), fixed_batch=data.train.fixed_batch)
    ctx.stop_reason = state.stop_reason
    ctx.updates = resume_state["updates"] if resume_state is not None else 0
    method.setup(ctx)

    def save(loop_state: LoopState, path: Path = ckpt_path) -> str:
        save_checkpoint({
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": rt.scaler.state_dict() if rt.scaler is not None else None,
            "method": method.state_dict(), "loader": data.train.state_dict(), "rng": rng_state(),
            "counter": counter.state_dict(), "updates": ctx.updates, "loop": vars(loop_state).copy(),
            "config": config_yaml, "model_spec": spec,
        }, path)
        return str(path)

    monitor_set = data.val if data.val is not None else data.test
    suite = OmegaConf.to_container(cfg.attack) if cfg.get("attack") else {}

    def periodic_eval() -> dict:
        scores = evaluate(ctx.attack_model, monitor_set, periodic_suite(suite), n=cfg.eval.every_n,
                          batch_size=cfg.eval.batch_size, views=method.eval_views(model))
        # Model selection on the held-out split only (never on the test set): keep the most robust weights.
        if data.val is not None:
            score = scores[next((k for k in scores if k not in ("n", "clean")), "clean")]
            if state.best_val_score is None or score > state.best_val_score:
                state.best_val_score = score
                save(state, ckpt_path.with_name("best.pt"))
        return scores

    logger = build_logger(cfg.logger, OmegaConf.to_container(cfg), run_dir)
    exit_code = 1
    try:
        if not state.finished:
            progress = con.TrainProgress(cfg.trainer.epochs, len(data.train), cfg.trainer.progress,
                                         cfg.trainer.log_every_s)

            def on_epoch(record: dict) -> None:
                logger.log(record)
                shown = {k: v for k, v in record.items() if k != "epoch"}
                progress.print(f"epoch {record['epoch']}/{cfg.trainer.epochs}  " +
                               "  ".join(f"{k} {v:.4g}" for k, v in shown.items()))

            run_epochs(ctx, method, data.train, cfg, state, progress=progress, save=save, on_epoch=on_epoch,
                       periodic_eval=periodic_eval if cfg.eval.every else None)
        con.console.print(f"final evaluation on {cfg.eval.n or data.test.n_examples} test examples: "
                          f"clean, {', '.join(suite) or 'no attacks'}")
        scores = evaluate(model, data.test, suite, n=cfg.eval.n, batch_size=cfg.eval.batch_size,
                          views=method.eval_views(model),
                          on_progress=lambda line: con.console.print(line, markup=False))
        results = build_results(cfg, state, counter, data.train.n_examples, scores, rt,
                                checkpoint=str(ckpt_path))
        write_results(results, results_path)
        logger.log({**{f"eval/{k}": v for k, v in scores.items() if k != "n"}, "train_time_s": state.train_time_s})
        logger.summary({"train_time_s": state.train_time_s, "passes_per_example": results["passes_per_example"],
                        **{f"final/{k}": v for k, v in scores.items()}})
        con.print_results(results)
        con.console.print(f"results: {results_path}")
        exit_code = 0
        return results
    finally:
        logger.finish(exit_code)


def _resume_state(cfg, ckpt_path: Path) -> dict | None:
    if cfg.resume in (None, "never"):
        return None
    path = ckpt_path if cfg.resume == "auto" else Path(cfg.resume)
    if cfg.resume == "auto" and not path.exists():
        return None
    state = load_checkpoint(path)
    saved = OmegaConf.create(state["config"])
    for key in TRAJECTORY_KEYS:
        ours, theirs = OmegaConf.select(cfg, key), OmegaConf.select(saved, key)
        if _plain(ours) != _plain(theirs):
            raise CheckpointError(f"cannot resume from {path}: it was trained with {key}={_plain(theirs)}, this run "
                                  f"has {key}={_plain(ours)}; use a new run directory or resume=never")
    return state


def _plain(value):
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def _restore(state, model, optimizer, scaler, method, loader, counter, loop: LoopState) -> None:
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint does not match this model: {str(e).splitlines()[0][:200]}") from None
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    method.load_state_dict(state["method"])
    loader.load_state_dict(state["loader"])
    counter.load_state_dict(state["counter"])
    for k, v in state["loop"].items():
        setattr(loop, k, v)
    set_rng_state(state["rng"])
