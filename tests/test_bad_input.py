"""The bad-input catalogue: each bad value is refused in one line that names it and what is valid (exit status 2 from
the CLI, no traceback, no run folder), never accepted silently.

Most are config-time errors, checked in-process against check_config: the CLI raises them before it writes anything
(tests/test_cli.py covers that path once for every kind of error). The few that need the data, or Hydra's own
record of the command line, run the command itself (slow tier).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

from advtrain.config import ConfigError, check_config, check_eval_trainer
from advtrain.schema import TRAIN_SECTIONS
from conftest import SYNTH, TINY, checked, compose_train, run_cli


# (overrides, fragments the one line must hold: the bad key and value, then what is valid)
CONFIG_TIME = {
    "betas_empty": (["optim=adam", "optim.betas=[]"], ["optim.betas=[]", "exactly two numbers in [0, 1)"]),
    "betas_out_of_range": (["optim=adam", "optim.betas=[2,3]"], ["optim.betas=[2.0, 3.0]", "in [0, 1)"]),
    "weight_decay_nan": (["optim.weight_decay=nan"], ["optim.weight_decay=nan", "finite number"]),
    "lr_inf": (["optim.lr=inf"], ["optim.lr=inf", "finite number"]),
    "eps_warmup_nan": (["trainer.eps_warmup=nan"], ["trainer.eps_warmup=nan", "finite number"]),
    "seed_huge": (["seed=99999999999999999999"], ["seed=99999999999999999999", "[0, 2**64 - 1]"]),
    "seed_2_to_the_64": (["seed=18446744073709551616"], ["seed=18446744073709551616", "[0, 2**64 - 1]"]),
    "seed_negative": (["seed=-1"], ["seed=-1", "[0, 2**64 - 1]"]),
    "eval_seed_negative": (["eval.seed=-1"], ["eval.seed=-1", "[0, 2**64 - 1]"]),
    "std_zero": (["dataset.std=[0]"], ["dataset.std=[0.0]", "must be > 0"]),
    "std_length": (["dataset.std=[0.2,0.2]"], ["dataset.std=[0.2, 0.2]", "cifar10 images have 3 channels"]),
    "mean_length_synthetic": (["dataset=synthetic", "+dataset.mean=[0.5,0.5]"],
                              ["dataset.mean=[0.5, 0.5]", "synthetic images have 1 channel"]),
    "pgd_steps_negative": (["method=pgd", "method.steps=-1"], ["method.steps=-1", "choose a value >= 0"]),
    "trades_steps_negative": (["method=trades", "method.steps=-1"], ["method.steps=-1", "choose a value >= 0"]),
    "oat_steps_zero": (["method=oat", "method.steps=0"], ["method.steps=0", "choose a value >= 1"]),
    "gaat_steps_zero": (["method=gaat", "method.steps=0"], ["method.steps=0", "choose a value >= 1"]),
    "fgsm_rs_guard_steps": (["method=fgsm_rs", "method.guard_steps=-2"], ["method.guard_steps=-2", ">= 1"]),
    "free_replays_zero": (["method=free", "method.replays=0"], ["method.replays=0", ">= 1"]),
    "preact_depth_negative": (["arch=preact_resnet18", "arch.depth=-1"], ["arch.depth=-1", "valid: 18, 34"]),
    "wrn_depth": (["arch=wrn34_10", "arch.depth=30"], ["arch.depth=30", "valid: 10, 16, 22, 28, 34"]),
    "peak_at_above_1": (["schedule=cyclic", "schedule.peak_at=2"], ["schedule.peak_at=2.0", "in [0, 1]"]),
    "peak_at_negative": (["schedule=cyclic", "schedule.peak_at=-1"], ["schedule.peak_at=-1.0", "in [0, 1]"]),
    "milestone_above_1": (["schedule=piecewise", "schedule.milestones=[0.5,2]"],
                          ["schedule.milestones=[0.5, 2.0]", "in [0, 1]"]),
    "warmup_above_1": (["schedule=piecewise", "schedule.warmup=1.5"], ["schedule.warmup=1.5", "in [0, 1]"]),
    "final_factor_above_1": (["schedule=cosine", "schedule.final_factor=2"],
                             ["schedule.final_factor=2.0", "in [0, 1]"]),
    "log_every_negative": (["trainer.log_every_s=-1"], ["trainer.log_every_s=-1.0", ">= 0"]),
    "log_every_nan": (["trainer.log_every_s=nan"], ["trainer.log_every_s=nan", "finite number"]),
    "attack_twice": (["attack=[pgd20,pgd20]"], ["attack=[pgd20,pgd20]", "pgd20 more than once", "attack=[pgd20]"]),
    "eval_n_beyond_test_set": (["eval.n=10000000"], ["eval.n=10000000", "10000 test examples of cifar10"]),
    "eval_n_beyond_synthetic": (["dataset=synthetic", "dataset.n_test=128", "eval.n=129"],
                                ["eval.n=129", "128 test examples", "at most 128"]),
}


@pytest.mark.parametrize("case", CONFIG_TIME)
def test_a_bad_value_is_refused_at_config_time_in_one_line(case):
    overrides, fragments = CONFIG_TIME[case]
    overrides = ["logger=none", *overrides]
    with pytest.raises(ConfigError) as err:
        check_config(compose_train(overrides), TRAIN_SECTIONS, overrides=overrides)
    message = str(err.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_a_batch_larger_than_the_training_set_is_refused_once_the_data_is_known():
    from advtrain.data import build_data

    cfg = checked([*SYNTH, "dataset.n_train=100", "dataset.val_size=20", "trainer.batch_size=81"])
    # Built with an evaluation's batch size (advtrain-eval builds the training loader too), the data is fine ...
    data = build_data(cfg.dataset, device=torch.device("cpu"), seed=0, batch_size=cfg.trainer.batch_size)
    # ... but training cannot make an epoch of it.
    with pytest.raises(ConfigError) as err:
        len(data.train)
    assert "trainer.batch_size=81 is larger than the 80 training examples" in str(err.value)
    assert "choose at most 80" in str(err.value) and "\n" not in str(err.value)


def _compose_eval(overrides: list[str]):
    with initialize_config_module(config_module="advtrain.conf", version_base="1.3"):
        return compose(config_name="eval", overrides=["checkpoint=last.pt", *overrides])


def test_advtrain_eval_refuses_trainer_keys_that_only_shape_training():
    check_eval_trainer(_compose_eval(["trainer.accelerator=cpu", "trainer.precision=fp32"]).trainer)
    with pytest.raises(ConfigError) as err:
        check_eval_trainer(_compose_eval(["+trainer.epochs=3"]).trainer)
    message = str(err.value)
    assert "trainer.epochs has no effect on advtrain-eval" in message and "accelerator, precision" in message
    assert "\n" not in message


def test_report_shows_a_nan_accuracy_as_missing_with_a_one_line_warning(tmp_path, capsys):
    from advtrain.report import main

    record = {"method": "pgd", "dataset": "mnist", "arch": "mnist_net", "seed": 0, "train_time_s": 10.0,
              "passes_per_example": 11.0, "eval": {"n": 100, "clean": float("nan"), "pgd20": 0.5}}
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text(json.dumps(record))  # json writes NaN, as Python's reader takes
    main([str(tmp_path)])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(tmp_path / "run" / "results.json") in err and "eval.clean=nan" in err
    row = (tmp_path / "report.md").read_text().splitlines()[2]
    assert [cell.strip() for cell in row.split("|")[5:7]] == ["", "50.00"]  # clean (%) empty, pgd20 (%) as recorded


# The command itself: what only the data or Hydra's record of the command line shows, and one config-time error to
# see the whole path (exit status 2, one line, no traceback, no run folder).
COMMANDS = {
    "batch_larger_than_training_set": (["trainer.batch_size=1000"],
                                       "trainer.batch_size=1000 is larger than the 512 training examples"),
    "attack_twice": (["attack=[pgd20,pgd20]"], "attack=[pgd20,pgd20] names pgd20 more than once"),
    "steps_negative": (["method=pgd", "method.steps=-1"], "method.steps=-1 is the attack's step count"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", COMMANDS)
def test_a_bad_command_ends_in_one_line_with_status_2_and_no_run_folder(case, tmp_path):
    extra, fragment = COMMANDS[case]
    run_dir = tmp_path / "run"
    proc = run_cli([*TINY, *extra, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("advtrain: error: ") and fragment in lines[0], proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not run_dir.exists()
    assert not list(Path(tmp_path).iterdir())
