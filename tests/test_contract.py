"""The method contract end to end, through tests/plugins/contract_method.py, a method that uses every part of it
(features, conditioning, accumulation over two sub-steps, a frozen companion model from an advtrain checkpoint, two
evaluation views): it trains, resumes bit-identically, runs on 2 gloo ranks, and results.json, advtrain-eval,
advtrain-report and load_model(view=...) all show both views."""
from __future__ import annotations

import csv
import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import advtrain
from advtrain.engine.context import TrainContext
from advtrain.attacks import PassCounter
from conftest import REPO, TINY, interrupt_after, run_cli

PLUGINS = REPO / "tests" / "plugins"
CONTRACT = [*TINY, "trainer.epochs=3", "trainer.log_every_s=0", "trainer.deterministic=true",
            f"hydra.searchpath=[file://{PLUGINS / 'conf'}]", "method=contract"]
ENV = {"PYTHONPATH": os.pathsep.join([str(PLUGINS), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("teacher")
    proc = run_cli([*TINY, "method=natural", "trainer.epochs=1", "attack=[]", f"hydra.run.dir={run_dir}"],
                   cwd=run_dir)
    assert proc.returncode == 0, proc.stderr
    return run_dir / "checkpoints" / "last.pt"


@pytest.fixture(scope="module")
def contract_run(teacher, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("contract")
    proc = run_cli([*CONTRACT, f"method.teacher={teacher}", "dataset.val_size=64", "eval.every=1",
                    f"hydra.run.dir={run_dir}"], cwd=run_dir, env=ENV)
    assert proc.returncode == 0, proc.stderr
    return run_dir


def _weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)["model"]


@pytest.mark.slow
def test_results_hold_both_views_and_the_checkpoint_only_the_student(contract_run, teacher):
    results = json.loads((contract_run / "results.json").read_text())
    assert set(results["views"]) == {"plain", "shifted"}
    for scores in results["views"].values():
        assert set(scores) == {"n", "clean", "pgd20"} and 0 <= scores["pgd20"] <= scores["clean"] <= 1
    assert results["eval"] == results["views"]["plain"]  # scripts that read "eval" get the first view
    assert results["passes_per_example"] == pytest.approx(2 + 1 + 1 / 3)  # 2 attack steps, update, teacher
    state = torch.load(contract_run / "checkpoints" / "last.pt", weights_only=True)
    assert state["companions"] == {"teacher": str(teacher)}
    assert not any(k.startswith("teacher") for k in state["model"]) and "body.1.gain" in state["model"]
    assert (contract_run / "checkpoints" / "best.pt").is_file()  # selected on the shifted view's PGD-20
    history = results["history"]
    assert {"eval/plain/pgd20", "eval/shifted/pgd20"} <= set(history[0])


@pytest.mark.slow
def test_load_model_fixes_a_view(contract_run):
    sys.path.insert(0, str(PLUGINS))  # the checkpoint names its method's class, which must be importable
    try:
        plain = advtrain.load_model(contract_run / "checkpoints" / "last.pt")
        shifted = advtrain.load_model(contract_run / "checkpoints" / "last.pt", view="shifted")
        with pytest.raises(advtrain.errors.CheckpointError, match="'plain', 'shifted'"):
            advtrain.load_model(contract_run / "checkpoints" / "last.pt", view="nope")
    finally:
        sys.path.remove(str(PLUGINS))
    x = torch.rand(5, 1, 12, 12)
    with torch.no_grad():
        assert torch.equal(shifted(x), plain(x, cond=torch.ones(5)))
        assert not torch.equal(shifted(x), plain(x))  # the gain was trained: the views differ


@pytest.mark.slow
def test_advtrain_eval_and_report_show_both_views(contract_run, tmp_path):
    proc = run_cli([f"checkpoint={contract_run / 'checkpoints' / 'last.pt'}", "attack=[pgd20]", "eval.n=64",
                    f"hydra.run.dir={tmp_path / 'eval'}"], cwd=tmp_path, program="advtrain-eval", env=ENV)
    assert proc.returncode == 0, proc.stderr
    evaluated = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert set(evaluated["views"]) == {"plain", "shifted"} and evaluated["kind"] == "eval"

    proc = run_cli([str(contract_run), "--out", str(tmp_path / "report")], cwd=tmp_path, program="advtrain-report")
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader((tmp_path / "report" / "report.csv").open(newline="")))
    assert sorted(r["view"] for r in rows) == ["plain", "shifted"] and all(r["method"] == "contract" for r in rows)
    assert "contract [shifted]" in proc.stdout
    assert (tmp_path / "report" / "report_views.png").stat().st_size > 10_000


@pytest.mark.slow
def test_a_resumed_contract_run_equals_an_uninterrupted_one(contract_run, teacher, tmp_path):
    args = [*CONTRACT, f"method.teacher={teacher}"]
    straight = tmp_path / "straight"
    proc = run_cli([*args, f"hydra.run.dir={straight}"], cwd=tmp_path, env=ENV)
    assert proc.returncode == 0, proc.stderr
    resumed = tmp_path / "resumed"
    env = {**os.environ, **ENV}
    os.environ["PYTHONPATH"], saved = env["PYTHONPATH"], os.environ.get("PYTHONPATH")
    try:  # interrupt_after starts the CLI with this process's environment
        stopped = interrupt_after([*args, f"hydra.run.dir={resumed}"], tmp_path, "epoch 2/3 batch 3/")
    finally:
        if saved is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = saved
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr
    proc = run_cli([*args, f"hydra.run.dir={resumed}"], cwd=tmp_path, env=ENV)
    assert proc.returncode == 0 and "resumed from" in proc.stdout, proc.stderr
    a, b = _weights(straight / "checkpoints" / "last.pt"), _weights(resumed / "checkpoints" / "last.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_the_contract_method_trains_on_two_gloo_ranks(teacher, tmp_path):
    run_dir = tmp_path / "ddp"
    proc = run_cli([*CONTRACT, f"method.teacher={teacher}", "trainer.devices=2", "trainer.accelerator=cpu",
                    f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=ENV)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((run_dir / "results.json").read_text())
    assert results["world_size"] == 2 and set(results["views"]) == {"plain", "shifted"}


@pytest.mark.slow
def test_a_missing_teacher_is_one_line(tmp_path):
    proc = run_cli([*CONTRACT, f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, env=ENV)
    assert proc.returncode == 2 and "method.teacher is required but not set" in proc.stderr
    proc = run_cli([*CONTRACT, f"method.teacher={tmp_path / 'none.pt'}", f"hydra.run.dir={tmp_path / 'run'}"],
                   cwd=tmp_path, env=ENV)
    assert proc.returncode == 2 and "the method's teacher model: checkpoint not found" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_accumulated_backwards_give_the_gradient_of_the_summed_loss():
    torch.manual_seed(0)
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))

    def context():
        torch.manual_seed(1)
        model = nn.Linear(5, 3)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        return model, TrainContext(model=model, attack_model=model, optimizer=optimizer, scaler=None,
                                   counter=PassCounter(), device=torch.device("cpu"), autocast=torch.no_grad,
                                   epochs=1, batches_per_epoch=1)

    loss = nn.functional.cross_entropy
    whole, ctx = context()
    ctx.update(loss(whole(x[:4]), y[:4]) + loss(whole(x[4:]), y[4:]))
    parts, ctx = context()
    ctx.backward(loss(parts(x[:4]), y[:4]), last=False)
    assert ctx.updates == 0
    ctx.backward(loss(parts(x[4:]), y[4:]))
    ctx.step()
    assert ctx.updates == 1 and not ctx.accumulating
    for a, b in zip(whole.parameters(), parts.parameters()):
        assert torch.allclose(a, b, atol=1e-7)


def test_a_method_that_cannot_compile_is_refused_in_one_line(monkeypatch):
    from advtrain.config import check_config
    from advtrain.engine.precision import resolve_runtime
    from advtrain.engine.run import build_parts
    from advtrain.errors import ConfigError
    from advtrain.methods.pgd import PGDAT
    from advtrain.schema import TRAIN_SECTIONS
    from conftest import compose_train

    monkeypatch.setattr(PGDAT, "compilable", False)
    cfg = check_config(compose_train([*TINY, "trainer.compile=true"]), TRAIN_SECTIONS)
    with pytest.raises(ConfigError, match="method=pgd cannot run under torch.compile"):
        build_parts(cfg, resolve_runtime(cfg.trainer))
