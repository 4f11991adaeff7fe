"""Cluster launch: a real multirun through submitit's local executor, and the sbatch script SLURM would get."""
from __future__ import annotations

import json
import os

import pytest
import submitit
from hydra import compose, initialize_config_module
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from conftest import TINY, run_cli

pytestmark = pytest.mark.slow


def test_local_submitit_multirun_runs_each_job_in_a_subprocess(tmp_path):
    proc = run_cli(["-m", "hydra/launcher=local", "method=natural,fgsm_rs", *TINY, "trainer.epochs=1",
                    f"hydra.sweep.dir={tmp_path}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    results = sorted(tmp_path.glob("*/results.json"))
    assert [json.loads(p.read_text())["method"] for p in results] == ["natural", "fgsm_rs"]
    assert len(list((tmp_path / ".submitit").rglob("*_result.pkl"))) == 2  # submitit ran them as its jobs


def render_sbatch(overrides: list[str], folder) -> str:
    """The sbatch script for these overrides, translated to submitit as hydra-submitit-launcher does, unsent."""
    with initialize_config_module(config_module="advtrain.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=["hydra/launcher=slurm", *overrides], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    base = {"submitit_folder", "timeout_min", "cpus_per_task", "gpus_per_node", "tasks_per_node", "mem_gb", "nodes",
            "name", "stderr_to_stdout"}
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in launcher.items()
                                  if k not in ("_target_", "submitit_folder", "max_num_timeout")})
    return executor._executor._make_submission_file_text("python -m advtrain", "0")


def test_slurm_script_holds_the_requested_resources(tmp_path, monkeypatch):
    fake_bin = tmp_path / "bin"  # submitit only builds a SLURM executor where it finds srun
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 1\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}:{os.environ['PATH']}")
    script = render_sbatch(["hydra.launcher.partition=gpu", "hydra.launcher.account=lab", "hydra.launcher.qos=high",
                            "hydra.launcher.nodes=2", "hydra.launcher.gpus_per_node=4",
                            "hydra.launcher.tasks_per_node=4", "hydra.launcher.cpus_per_task=6",
                            "hydra.launcher.mem_gb=64", "hydra.launcher.timeout_min=90",
                            "+hydra.launcher.additional_parameters.mail-type=END"], tmp_path)
    for line in ("#SBATCH --partition=gpu", "#SBATCH --account=lab", "#SBATCH --qos=high", "#SBATCH --nodes=2",
                 "#SBATCH --gpus-per-node=4", "#SBATCH --ntasks-per-node=4", "#SBATCH --cpus-per-task=6",
                 "#SBATCH --mem=64GB", "#SBATCH --time=90", "#SBATCH --mail-type=END"):
        assert line in script, (line, script)
