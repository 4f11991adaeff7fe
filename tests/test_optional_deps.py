"""The core trains and evaluates without the optional pieces: pyautoattack (only for AutoAttack), wandb (only for
logger=wandb), submitit and the launcher plugins (only for hydra/launcher=...). A run that would need a missing one
says so in one line before any training."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, TINY
from hidden_packages import hiding_env

OPTIONAL = ["pyautoattack", "autoattack", "wandb", "submitit", "hydra_plugins.hydra_submitit_launcher",
            "hydra_plugins.hydra_joblib_launcher"]


def _advtrain(args: list[str], tmp_path, hidden=OPTIONAL):
    env = hiding_env(tmp_path / "hide", hidden, repo=REPO)
    return subprocess.run([sys.executable, "-m", "advtrain", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL)


def test_importing_the_core_loads_no_optional_package():
    code = ("import sys, advtrain, advtrain.cli, advtrain.engine.run, advtrain.engine.launch, "
            "advtrain.engine.evaluate_checkpoint, advtrain.report, advtrain.attacks, advtrain.methods; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'wandb', 'pyautoattack', 'submitit'}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.slow
def test_trains_and_evaluates_with_the_optional_packages_absent(tmp_path):
    run_dir = tmp_path / "run"
    proc = _advtrain([*TINY, "method=pgd", "attack=[pgd20,fgsm]", f"hydra.run.dir={run_dir}"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["eval"]) == {"n", "clean", "pgd20", "fgsm"}
    assert 0 <= results["eval"]["pgd20"] <= results["eval"]["clean"] <= 1
    assert (run_dir / "checkpoints" / "last.pt").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("args, package", [(["attack=[pgd20,autoattack]"], "pyautoattack"),
                                           (["logger=wandb", "logger.mode=offline"], "wandb")])
def test_a_run_that_needs_a_missing_package_stops_before_training(tmp_path, args, package):
    run_dir = tmp_path / "run"
    proc = _advtrain([*TINY, "logger=none", *args, f"hydra.run.dir={run_dir}"], tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and f"needs the {package} package" in proc.stderr
    assert f"pip install {package}" in proc.stderr
    assert not run_dir.exists()


@pytest.mark.parametrize("argv", [["--help"], ["trainer.epoch=3"], ["dataset.eps=12", "logger=none"]])
def test_help_and_config_errors_import_no_torch(argv, tmp_path):
    """`advtrain --help` and a config error answer before torch (seconds to import) is loaded."""
    code = ("import sys, contextlib, io\n"
            f"sys.argv = ['advtrain', *{argv!r}, 'hydra.run.dir={tmp_path / 'run'}']\n"
            "import advtrain.cli\n"
            "assert 'torch' not in sys.modules, 'importing the CLI loaded torch'\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
            "    advtrain.cli.train()\n"
            "print('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False", proc.stderr
