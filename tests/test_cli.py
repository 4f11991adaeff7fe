"""End to end: the `advtrain` and `advtrain-eval` commands in a subprocess, on tiny synthetic data."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

import advtrain
from conftest import REPO, TINY, interrupt_after, run_cli
from wandb_records import read_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("run")
    proc = run_cli([*TINY, "method=fgsm_rs", f"hydra.run.dir={run_dir}"], cwd=run_dir)
    assert proc.returncode == 0, proc.stderr
    return run_dir


def test_training_run_writes_results_and_a_loadable_checkpoint(trained):
    results = json.loads((trained / "results.json").read_text())
    for key in ("method", "dataset", "arch", "epochs", "seed", "train_time_s", "epoch_times_s", "images_per_s",
                "passes_per_example", "eval", "device", "world_size", "precision", "versions"):
        assert key in results, key
    assert (results["method"], results["dataset"], results["arch"]) == ("fgsm_rs", "synthetic", "mnist_net")
    assert len(results["epoch_times_s"]) == 2 and results["train_time_s"] == pytest.approx(sum(results["epoch_times_s"]))
    assert results["eval"]["n"] == 128 and 0 <= results["eval"]["pgd20"] <= results["eval"]["clean"] <= 1
    assert results["passes_per_example"] == pytest.approx(2.0)
    assert not list(trained.glob("*.log"))  # Hydra's job log goes to the console, not an empty file per run

    # The checkpoint gives back the same network: its clean accuracy equals the one the run reported.
    from advtrain.config import check_config
    from advtrain.schema import TRAIN_SECTIONS
    from advtrain.data import build_data
    from conftest import compose_train

    model = advtrain.load_model(trained / "checkpoints" / "last.pt")
    assert not model.training
    cfg = check_config(compose_train(TINY), TRAIN_SECTIONS)
    data = build_data(cfg.dataset, device=torch.device("cpu"), seed=0, batch_size=64)
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in data.test.batches(64))
    assert correct / data.test.n_examples == pytest.approx(results["eval"]["clean"])


def test_eval_command_writes_the_same_results_fields(trained, tmp_path):
    proc = run_cli([f"checkpoint={trained / 'checkpoints' / 'last.pt'}", "attack=[fgsm,pgd20]", "eval.n=64",
                    f"hydra.run.dir={tmp_path}"], cwd=tmp_path, program="advtrain-eval")
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    trained_results = json.loads((trained / "results.json").read_text())
    assert results["eval"]["n"] == 64 and set(results["eval"]) == {"n", "clean", "fgsm", "pgd20"}
    assert results["eval"]["pgd20"] <= results["eval"]["clean"]
    assert results["train_time_s"] == pytest.approx(trained_results["train_time_s"])
    assert (results["method"], results["epochs"]) == ("fgsm_rs", 2)


def test_evaluating_a_checkpoint_twice_gives_the_same_numbers(trained, tmp_path):
    args = [f"checkpoint={trained / 'checkpoints' / 'last.pt'}", "attack=[pgd20]", "eval.n=64"]
    runs = []
    for name in ("first", "second"):
        proc = run_cli([*args, f"hydra.run.dir={tmp_path / name}"], cwd=tmp_path, program="advtrain-eval")
        assert proc.returncode == 0, proc.stderr
        runs.append(json.loads((tmp_path / name / "results.json").read_text()))
    assert runs[0]["eval"] == runs[1]["eval"]
    assert runs[0]["eval_settings"]["seed"] == 0


def test_an_evaluation_stopped_by_sigterm_goes_on_from_its_last_batch(trained, tmp_path):
    args = [f"checkpoint={trained / 'checkpoints' / 'last.pt'}", "attack=[pgd20]", "attack.pgd20.steps=300",
            "eval.batch_size=16"]  # 8 batches of 16
    straight = run_cli([*args, f"hydra.run.dir={tmp_path / 'straight'}"], cwd=tmp_path, program="advtrain-eval")
    assert straight.returncode == 0, straight.stderr
    run_dir = tmp_path / "stopped"
    proc = interrupt_after([*args, f"hydra.run.dir={run_dir}"], tmp_path, "eval: 32 examples",
                           program="advtrain-eval")
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert proc.stderr.strip() == (
        f"advtrain-eval: stopped by SIGTERM during the evaluation; its progress is kept in {run_dir}/eval_progress.pt;"
        f" to continue, rerun the command with hydra.run.dir={run_dir}")
    rerun = run_cli([*args, f"hydra.run.dir={run_dir}"], cwd=tmp_path, program="advtrain-eval")
    assert rerun.returncode == 0, rerun.stderr
    assert "evaluation resumed from eval_progress.pt" in rerun.stdout and "eval: 16 examples" not in rerun.stdout
    results = [json.loads((d / "results.json").read_text())["eval"] for d in (tmp_path / "straight", run_dir)]
    assert results[0] == results[1] and not (run_dir / "eval_progress.pt").exists()


def test_eval_help_lists_only_what_advtrain_eval_takes(tmp_path):
    proc = run_cli(["--help"], cwd=tmp_path, program="advtrain-eval")
    assert proc.returncode == 0
    assert "attack: autoattack, cw, fgsm, pgd20, pgd50" in proc.stdout
    assert "method:" not in proc.stdout and "optim:" not in proc.stdout and "experiment:" not in proc.stdout


def test_help_lists_groups_and_options(tmp_path):
    proc = run_cli(["--help"], cwd=tmp_path)
    assert proc.returncode == 0
    methods = ", ".join(sorted(p.stem for p in (REPO / "advtrain" / "conf" / "method").glob("*.yaml")))
    for line in (f"method: {methods}", "attack: autoattack, cw, fgsm, pgd20, pgd50",
                 "experiment: cifar10_fgsm_rs_wong2020"):
        assert line in proc.stdout


def _weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)["model"]


def test_sigterm_checkpoints_and_resume_equals_an_uninterrupted_run(tmp_path):
    args = [*TINY, "method=pgd", "trainer.deterministic=true", "trainer.log_every_s=0", "trainer.epochs=3"]
    straight = tmp_path / "straight"
    proc = run_cli([*args, f"hydra.run.dir={straight}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr

    resumed = tmp_path / "resumed"
    interrupted = interrupt_after([*args, f"hydra.run.dir={resumed}"], tmp_path, "epoch 2/3 batch 3/")
    assert interrupted.returncode == 128 + signal.SIGTERM, interrupted.stderr
    assert "resume=auto" in interrupted.stderr and "Traceback" not in interrupted.stderr
    assert not (resumed / "results.json").exists()
    ckpt = torch.load(resumed / "checkpoints" / "last.pt", weights_only=True)
    # Written where it stopped (the signal lands a batch or two after the marker), before the end of training.
    assert (1, 3) <= (ckpt["loop"]["epoch"], ckpt["loop"]["batch"]) and not ckpt["loop"]["finished"]
    advtrain.load_model(resumed / "checkpoints" / "last.pt")

    proc = run_cli([*args, f"hydra.run.dir={resumed}", "resume=auto"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "resumed from" in proc.stdout
    a, b = _weights(straight / "checkpoints" / "last.pt"), _weights(resumed / "checkpoints" / "last.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ra = json.loads((straight / "results.json").read_text())
    rb = json.loads((resumed / "results.json").read_text())
    assert ra["eval"] == rb["eval"]
    assert [h["train/loss"] for h in ra["history"]] == pytest.approx([h["train/loss"] for h in rb["history"]])


def test_wandb_without_credentials_runs_offline_and_holds_the_logged_metrics(tmp_path):
    # No API key, no netrc, no WANDB_MODE, no terminal: the run must go offline by itself, never prompting.
    no_credentials = {"WANDB_MODE": None, "WANDB_API_KEY": None, "NETRC": None, "HOME": str(tmp_path)}
    proc = run_cli([*[a for a in TINY if a != "logger=none"], "logger=wandb", "logger.project=advtrain-test",
                    "logger.tags=[ci]", "method=natural", f"hydra.run.dir={tmp_path}"], cwd=tmp_path,
                   env=no_credentials, timeout=120)
    assert proc.returncode == 0, proc.stderr
    files = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert f"W&B: offline run written under {tmp_path / 'wandb'}; upload it with: wandb sync" in proc.stdout
    assert len(files) == 1
    run = read_run(files[0])
    results = json.loads((tmp_path / "results.json").read_text())
    losses = [row["train/loss"] for row in run["history"] if "train/loss" in row]
    assert losses == pytest.approx([h["train/loss"] for h in results["history"]])
    final = [row for row in run["history"] if "eval/pgd20" in row]
    assert final and final[-1]["eval/pgd20"] == pytest.approx(results["eval"]["pgd20"])
    assert final[-1]["train_time_s"] == pytest.approx(results["train_time_s"])
    assert run["config"]["method"]["name"] == "natural" and run["config"]["trainer"]["epochs"] == 2
    assert run["summary"]["final/clean"] == pytest.approx(results["eval"]["clean"])


def _corrupt_mnist(root: Path) -> None:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (raw / name).write_bytes(b"\x00\x00\x08\x03" + os.urandom(64))


@pytest.mark.parametrize("case", ["unknown_key", "eps_range", "wrong_type", "unknown_option", "missing_data",
                                  "corrupt_data", "nan_loss", "corrupt_checkpoint", "mismatched_checkpoint",
                                  "eval_n_zero", "eval_n_negative", "unknown_top_level_key", "key_of_another_method",
                                  "root_is_a_file_data", "run_dir_under_a_file", "eval_without_checkpoint"])
def test_bad_input_gives_one_clean_line(case, tmp_path, trained):
    run_dir = tmp_path / "run"
    base = TINY if "data" not in case else [a for a in TINY if not a.startswith(("dataset", "arch"))]
    args, program = [*base, f"hydra.run.dir={run_dir}"], "advtrain"
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    expect = {
        "eval_n_zero": (["eval.n=0"], "eval.n=0 must be a positive number of test examples, or null"),
        "eval_n_negative": (["eval.n=-5"], "eval.n=-5 must be a positive number"),
        "unknown_top_level_key": (["foo=1"], "unknown config key 'foo'; valid keys there: arch, attack,"),
        "key_of_another_method": (["method=natural", "method.steps=5"],
                                  "'method.steps' is not a setting of the chosen method option; it takes: name"),
        "root_is_a_file_data": (["dataset=mnist", "arch=mnist_net", f"dataset.root={a_file}"],
                                f"dataset.root={a_file} is a file; it must be the folder"),
        "run_dir_under_a_file": ([f"hydra.run.dir={a_file / 'run'}"],
                                 f"cannot create the run directory {a_file / 'run'}: Not a directory"),
        "unknown_key": (["trainer.epoch=3"], "unknown config key 'trainer.epoch' (did you mean trainer.epochs?)"),
        "eps_range": (["dataset.eps=12"], "dataset.eps=12 is outside the valid range [0, 1]"),
        "wrong_type": (["trainer.batch_size=big"], "trainer.batch_size"),
        "unknown_option": (["method=pgdd"], "pgdd"),
        "missing_data": (["dataset=mnist", "arch=mnist_net", f"dataset.root={tmp_path}", "dataset.download=false"],
                         "train-images-idx3-ubyte"),
        "corrupt_data": (["dataset=mnist", "arch=mnist_net", f"dataset.root={tmp_path / 'bad'}", "dataset.download=false"],
                         "train-images-idx3-ubyte"),
        "nan_loss": (["optim=sgd", "optim.lr=1e30", "trainer.nan_check_every=1"], "NaN"),
        "mismatched_checkpoint": (["arch=madry_cnn", f"resume={trained / 'checkpoints' / 'last.pt'}"],
                                  "arch"),
    }
    if case == "corrupt_data":
        _corrupt_mnist(tmp_path / "bad")
    if case == "corrupt_checkpoint":
        bad = tmp_path / "bad.pt"
        bad.write_bytes((trained / "checkpoints" / "last.pt").read_bytes()[:5000])
        args, program, fragment = [f"checkpoint={bad}", f"hydra.run.dir={run_dir}"], "advtrain-eval", "corrupt"
    elif case == "eval_without_checkpoint":
        args, program, fragment = [f"hydra.run.dir={run_dir}"], "advtrain-eval", "checkpoint= is required"
    else:
        extra, fragment = expect[case]
        args = [*args, *extra]
    proc = run_cli(args, cwd=tmp_path, program=program)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert fragment in lines[0] and "error" in lines[0]
    assert "+foo" not in lines[0]  # the top level takes no new keys: suggesting one would fail again
    assert not run_dir.exists()  # nothing half-written: not even Hydra's own files stay behind
    assert {p.name for p in tmp_path.iterdir()} <= {"a_file", "bad", "bad.pt"}


def test_a_corrupt_last_checkpoint_under_resume_auto_says_how_to_go_on(tmp_path, trained):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.pt").write_bytes((trained / "checkpoints" / "last.pt").read_bytes()[:5000])
    proc = run_cli([*TINY, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "is corrupt" in proc.stderr and "rerun with resume=never" in proc.stderr
    assert (run_dir / "checkpoints" / "last.pt").stat().st_size == 5000  # the user's file is left for them

    proc = run_cli([*TINY, f"hydra.run.dir={run_dir}", "resume=never", "trainer.epochs=1"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    advtrain.load_model(run_dir / "checkpoints" / "last.pt")


def test_a_checkpoint_from_before_a_method_knob_existed_resumes_at_its_default(tmp_path):
    from omegaconf import OmegaConf

    from advtrain.engine.checkpoint import load_checkpoint, save_checkpoint

    run_dir = tmp_path / "run"
    first = run_cli([*TINY, "method=pgd", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    last = run_dir / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    config = OmegaConf.create(state["config"])
    del config.method.adv_weight  # as written by a version without the knob
    state["config"] = OmegaConf.to_yaml(config)
    save_checkpoint({k: v for k, v in state.items() if k != "format"}, last)
    (run_dir / "results.json").unlink()  # trained, not yet evaluated: a rerun resumes into the evaluation

    changed = run_cli([*TINY, "method=pgd", "method.adv_weight=0.5", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert changed.returncode == 2 and changed.stderr.strip().count("\n") == 0, changed.stderr
    assert "trained with method.adv_weight=1.0, this run has method.adv_weight=0.5" in changed.stderr

    resumed = run_cli([*TINY, "method=pgd", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout + resumed.stderr
    assert json.loads((run_dir / "results.json").read_text())["epochs_run"] == 2


def test_fp16_on_the_cpu_warns_in_one_line_and_trains(tmp_path):
    proc = run_cli([*TINY, "trainer.epochs=1", "trainer.precision=fp16", f"hydra.run.dir={tmp_path / 'run'}"],
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    warning = [line for line in proc.stderr.splitlines() if "fp16" in line]
    assert len(warning) == 1 and warning[0].startswith("warning: trainer.precision=fp16 brings no speed on the CPU")
    assert json.loads((tmp_path / "run" / "results.json").read_text())["precision"] == "fp16"


def test_report_tables_every_run_under_a_folder(trained, tmp_path):
    proc = run_cli([str(trained)], cwd=tmp_path, program="advtrain-report")
    assert proc.returncode == 0, proc.stderr
    results = json.loads((trained / "results.json").read_text())
    assert "fgsm_rs" in proc.stdout and f"{100 * results['eval']['pgd20']:.2f}" in proc.stdout
    empty = run_cli([str(tmp_path)], cwd=tmp_path, program="advtrain-report")
    assert empty.returncode == 2 and "no results.json" in empty.stderr
