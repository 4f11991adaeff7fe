"""scripts/bench.py: its fields, its cost accounting and its pieces (timing split, the papers'-style reference step).
Speed itself is never asserted here: the numbers belong to docs/performance.md."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from advtrain.attacks import pgd
from advtrain.attacks import projected as engine
from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))  # bench.py's own modules (bench_measure, bench_reference)

SMALL = ["arch=mnist_net", "dataset.shape=[1,12,12]", "trainer.batch_size=16"]
QUICK = ["--steps", "2", "--warmup", "1", "--repeats", "2"]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _load("bench")


def _run(args: list[str], tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench.py"), *args, "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    return proc, (json.loads(out.read_text()) if out.exists() else None)


@pytest.mark.slow
def test_bench_prints_and_writes_every_field(tmp_path):
    proc, result = _run([*QUICK, "--ablate", "--skip", "compile", "method=pgd", "method.steps=10", *SMALL], tmp_path)
    assert proc.returncode == 0, proc.stderr
    names = [r["name"] for r in result["rows"]]
    assert names[:2] == ["fast path (advtrain)", "reference (papers' loop)"]
    for expected in ("attack grads into weights", "optimizer loop", "loss .item() every step",
                     "host DataLoader, per-image transforms", "fast path, measured again"):
        assert expected in names
    assert not any("compile" in n for n in names)  # --skip
    for row in result["rows"]:
        assert row["error"] is None, row
        assert row["images_per_s"] > 0 and row["of_matrix_rate"] > 0 and row["spread"] >= 0
    ours = [r for r in result["rows"] if r["name"] != "reference (papers' loop)"]
    for row in ours:
        assert row["passes_per_example"] == pytest.approx(11.0)  # PGD-10: 10 attack steps + the update
        assert row["attack_share"] + row["update_share"] == pytest.approx(1.0)
        # (which share is larger is a timing, and 2 steps per window on a loaded machine can swing it: not tested)
    assert result["rows"][0]["vs_fast_path"] == 1.0
    assert result["speedup_vs_reference"] > 0 and result["flops_per_image"] > 0 and result["matrix_rate_tflops"] > 0
    assert result["reference_workers"] == 0  # grayscale data: the MNIST scripts' DataLoader has no workers
    assert result["command"].startswith("python scripts/bench.py --steps 2")
    assert "advtrain / reference:" in proc.stdout and "× fast path" in proc.stdout


@pytest.mark.parametrize("method, passes", [("pgd", 11.0), ("fgsm_rs", 2.0), ("natural", 1.0)])
def test_epoch_cost_in_passes(bench, method, passes):
    """A PGD-10 AT step costs 11 passes per example in the accounting, FGSM-RS 2, natural training 1."""
    extra = ["method.steps=10"] if method == "pgd" else ["method.guard=false"] if method == "fgsm_rs" else []
    opts = bench.argparse.Namespace(steps=2, warmup=1, repeats=1, reference=False, ablate=False, skip=[],
                                    workers=0)
    result = bench.bench(opts, [*SMALL, f"method={method}", *extra])
    assert result["rows"][0]["passes_per_example"] == pytest.approx(passes)


def test_bad_override_is_one_line(tmp_path):
    proc, result = _run(["method=nope"], tmp_path)
    assert proc.returncode == 2 and result is None
    assert proc.stderr.strip().count("\n") == 0
    assert "method=nope is not an option" in proc.stderr and "pgd" in proc.stderr


def test_split_of_marked_steps(bench):
    """Attack time is each step's time outside its updates' forward-to-optimizer-step spans."""
    marks = bench.Marks(torch.device("cpu"))
    marks.items = [("step", 0.0), ("update_forward", 3.0), ("update_end", 4.0),  # step 1: 3 attack + 1 update
                   ("step", 4.5), ("update_forward", 5.0), ("update_end", 6.0),  # step 2, two updates (FREE)
                   ("update_forward", 6.0), ("update_end", 7.0), ("step_end", 7.5)]
    attack, update = marks.split()
    assert update == pytest.approx(3.0) and attack == pytest.approx(4.5)


def test_weight_grad_toggle_runs_the_same_attack(bench):
    """The 'attack grads into weights' row measures the papers' backward, not a different attack."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    x, y = torch.rand(8, 1, 4, 4), torch.randint(0, 3, (8,))
    plain = engine.input_gradient
    torch.manual_seed(1)
    expected = pgd(model, x, y, eps=0.1, alpha=0.03, steps=3)
    with bench.attack_grads_into_weights(True):
        assert engine.input_gradient is not plain
        torch.manual_seed(1)
        got = pgd(model, x, y, eps=0.1, alpha=0.03, steps=3)
        assert model[1].weight.grad is not None  # the backward did reach the weights
    assert engine.input_gradient is plain
    assert torch.equal(got, expected)


def test_reference_pgd_raises_loss_inside_the_ball():
    reference = _load("bench_reference")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    x, y = torch.rand(32, 1, 4, 4), torch.randint(0, 3, (32,))
    delta = reference._attack(model, x, y, eps=0.1, alpha=0.03, steps=5, start="uniform")
    assert delta.abs().max() <= 0.1 + 1e-6 and (x + delta).min() >= 0 and (x + delta).max() <= 1
    assert F.cross_entropy(model(x + delta), y) > F.cross_entropy(model(x), y)


def test_flop_counter_agrees_with_the_published_count():
    """The FLOP/s column rests on this count: PreActResNet-18 at 32×32 is 1.111 GFLOP per forward
    (../shared/specs/reference-numbers.md, multiply-adds ×2 over conv and linear layers)."""
    from bench_measure import MatrixFlops

    from advtrain.models import build_model

    model = build_model("preact_resnet18", num_classes=10, in_shape=(3, 32, 32), mean=[0.0], std=[1.0])
    with torch.no_grad(), MatrixFlops() as flops:
        model(torch.zeros(2, 3, 32, 32))
    assert flops.total / 2 == pytest.approx(1.111e9, rel=0.01)


@pytest.mark.slow
def test_bench_autoattack_runs_both_implementations_to_the_same_accuracy(tmp_path):
    from advtrain.config import check_config
    from advtrain.engine import run
    from advtrain.schema import TRAIN_SECTIONS
    from conftest import SYNTH, compose_train

    cfg = check_config(compose_train([*SYNTH, "dataset.n_train=128", "trainer.batch_size=64", "trainer.epochs=1",
                                      "dataset.eps=0.05"]), TRAIN_SECTIONS)
    run.train(cfg, tmp_path)
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_autoattack.py"),
                           str(tmp_path / "checkpoints" / "last.pt"), "--n", "16", "--repeats", "1"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    ours, official = (line.split("robust accuracy ")[1].split("%")[0] for line in lines[:2])
    assert lines[0].startswith("advtrain") and lines[1].startswith("official") and ours == official
    assert lines[2].startswith("advtrain / official: ")
