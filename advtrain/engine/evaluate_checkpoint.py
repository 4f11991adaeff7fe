"""`advtrain-eval`: evaluate any saved checkpoint with any attack suite; writes the same results.json as training."""
from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf

from advtrain.config import check_config, check_eval_n
from advtrain.errors import ConfigError
from advtrain.schema import DatasetConfig, EvalConfig, TrainerConfig
from advtrain.data import build_data
from advtrain.engine.checkpoint import Checkpoint, RunCheckpoints
from advtrain.engine.distributed import SINGLE
from advtrain.engine.finish import final_evaluation, record_results
from advtrain.engine.loop import LoopState
from advtrain.engine.network import model_from_checkpoint
from advtrain.engine.precision import resolve_runtime
from advtrain.engine.results import build_results, view_flops
from advtrain.engine.signals import stop_at_once


def evaluate_checkpoint(cfg, run_dir: Path) -> dict:
    """Evaluate cfg.checkpoint into `run_dir` (which the caller holds, advtrain.engine.rundir)."""
    ckpts = RunCheckpoints(run_dir, SINGLE)
    _refuse_a_training_run(ckpts)
    state = Checkpoint.load(cfg.checkpoint)
    saved = OmegaConf.create(state.config)
    overrides = {k: v for k, v in OmegaConf.to_container(cfg.dataset).items() if v is not None}
    # Rebuild the suite against the checkpoint's dataset, so ${dataset.eps} means the threat model it was trained for.
    combined = OmegaConf.create({
        "dataset": OmegaConf.to_container(OmegaConf.merge(saved.dataset, overrides)),
        "attack": OmegaConf.to_container(cfg.attack, resolve=False),
        "eval": OmegaConf.to_container(cfg.eval), "trainer": OmegaConf.to_container(cfg.trainer),
    })
    checked = check_config(combined, {"dataset": DatasetConfig, "eval": EvalConfig, "trainer": TrainerConfig})
    if checked.trainer.devices != 1:
        raise ConfigError(f"trainer.devices={checked.trainer.devices}: advtrain-eval evaluates on one device")
    rt = resolve_runtime(checked.trainer)
    data = build_data(checked.dataset, device=rt.device, seed=saved.seed, batch_size=checked.eval.batch_size)
    check_eval_n(checked.eval.n, data.test.n_examples, checked.dataset.name)
    method, model = model_from_checkpoint(state)
    model = model.to(rt.device).eval()
    suite = OmegaConf.to_container(checked.attack)
    # A stop signal (preemption, scancel, Ctrl-C) ends it in one line; the batches done are kept for the rerun.
    then = (f"its progress is kept in {run_dir / 'eval_progress.pt'}; to continue, rerun the command with "
            f"hydra.run.dir={run_dir}")
    with stop_at_once(run_dir, lambda: None, then) as stops:
        scores, warnings = final_evaluation(model, data.test, suite, checked.eval, method.eval_views(), ckpts=ckpts,
                                            stops=stops, what=f"evaluating {cfg.checkpoint}")
    record = OmegaConf.merge(saved, {"dataset": checked.dataset, "attack": checked.attack, "eval": checked.eval})
    results = build_results(record, LoopState(**state.loop), float(state.counter["total"]), data.train.n_examples,
                            scores, rt, checkpoint=str(cfg.checkpoint), world_size=state.world_size, kind="eval",
                            warnings=warnings, flops=view_flops(method.eval_views()))
    record_results(results, ckpts)
    return results


def _refuse_a_training_run(ckpts: RunCheckpoints) -> None:
    """advtrain-eval writes its own results.json: never over a training run's, nor into its checkpoints' folder."""
    if ckpts.last_path.exists() or _kind(ckpts.results_path) not in (None, "eval"):
        raise ConfigError(f"hydra.run.dir={ckpts.run_dir} is a training run's folder; advtrain-eval would replace "
                          "its results.json: give the evaluation a folder of its own (or leave hydra.run.dir out)")


def _kind(results_path: Path) -> str | None:
    try:
        return json.loads(results_path.read_text()).get("kind", "train")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, AttributeError):
        return "unreadable"
