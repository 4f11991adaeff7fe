"""`advtrain-eval`: evaluate any saved checkpoint with any attack suite; writes the same results.json as training."""
from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from advtrain.config import check_config
from advtrain.errors import ConfigError
from advtrain.schema import DatasetConfig, EvalConfig, TrainerConfig
from advtrain.data import build_data
from advtrain.engine.checkpoint import load_checkpoint
from advtrain.engine.network import model_from_checkpoint
from advtrain.engine.eval_progress import progress_path
from advtrain.engine.evaluate import evaluate_views
from advtrain.engine.loop import LoopState
from advtrain.engine.precision import resolve_runtime
from advtrain.engine.results import build_results, view_flops, write_results
from advtrain.engine.signals import stop_at_once
from advtrain.logging import console as con


def evaluate_checkpoint(cfg, run_dir: Path) -> dict:
    state = load_checkpoint(cfg.checkpoint)
    saved = OmegaConf.create(state["config"])
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
    method, model = model_from_checkpoint(state)
    model = model.to(rt.device).eval()
    suite = OmegaConf.to_container(checked.attack)
    con.console.print(f"evaluating {cfg.checkpoint} on {checked.eval.n or data.test.n_examples} test examples: "
                      f"clean, {', '.join(suite) or 'no attacks'}")
    warnings: list[str] = []
    progress_file = progress_path(run_dir)
    # A stop signal (preemption, scancel, Ctrl-C) ends it in one line; the batches done are kept for the rerun.
    then = f"its progress is kept in {progress_file}; to continue, rerun the command with hydra.run.dir={run_dir}"
    with stop_at_once(run_dir, lambda: None, then) as stops:
        stops.phase = "during the evaluation"
        scores = evaluate_views(model, data.test, suite, n=checked.eval.n, batch_size=checked.eval.batch_size,
                                seed=checked.eval.seed, views=method.eval_views(), warnings=warnings,
                                on_progress=lambda line: con.console.print(line, markup=False),
                                progress_file=progress_file)
    loop = LoopState(**state["loop"])
    record = OmegaConf.merge(saved, {"dataset": checked.dataset, "attack": checked.attack, "eval": checked.eval})
    results = build_results(record, loop, float(state["counter"]["total"]), data.train.n_examples, scores, rt,
                            checkpoint=str(cfg.checkpoint), world_size=int(state.get("world_size", 1)), kind="eval",
                            warnings=warnings, flops=view_flops(method.eval_views()))
    write_results(results, run_dir / "results.json")
    progress_file.unlink(missing_ok=True)
    con.print_results(results)
    con.console.print(f"results: {run_dir / 'results.json'}")
    return results
