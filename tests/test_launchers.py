"""Cluster launch: a real multirun through submitit's local executor, and the sbatch script SLURM would get."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

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
    # Printed by the submitting process once submitit's jobs have returned.
    assert proc.stdout.splitlines()[-2:] == [f"sweep folder: {tmp_path} (2 jobs: 2 finished)",
                                             f"compare the runs: advtrain-report {tmp_path}"], proc.stdout[-2000:]


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


def _job_processes(folder) -> list[int]:
    """PIDs of submitit's task processes for jobs whose files live under `folder`."""
    out = subprocess.run(["pgrep", "-f", f"submitit.core._submit {folder}"], capture_output=True, text=True).stdout
    return [int(pid) for pid in out.split()]


def test_preempted_submitit_job_checkpoints_requeues_and_finishes_from_its_checkpoint(tmp_path):
    """submitit signals USR2 before a time limit or on preemption: the job must write its checkpoint, hand the
    signal to submitit (which requeues it) and, requeued, continue from that checkpoint."""
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(["advtrain", "-m", "hydra/launcher=local", "method=natural", *TINY, "trainer.epochs=40",
                             "trainer.log_every_s=0", f"hydra.sweep.dir={tmp_path}"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    deadline = time.time() + 180
    while True:  # wait until the job trains, then preempt it the way SLURM/submitit would
        logs = list((tmp_path / ".submitit").rglob("*_log.out"))
        if logs and "epoch 3/40" in logs[0].read_text():
            break
        assert proc.poll() is None and time.time() < deadline, "the job never started training"
        time.sleep(0.2)
    (pid,) = _job_processes(tmp_path / ".submitit")
    os.kill(pid, signal.SIGUSR2)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    log = logs[0].read_text()
    assert "stopped by SIGUSR2" in log + (logs[0].with_name(logs[0].name.replace("out", "err")).read_text())
    assert "resumed from" in log
    results = json.loads(next(tmp_path.glob("*/results.json")).read_text())
    assert results["epochs_run"] == 40 and len(results["history"]) == 40


def test_rerunning_a_sweep_skips_finished_jobs_and_resumes_the_interrupted_one(tmp_path):
    args = ["-m", "method=natural,pgd", *TINY, "trainer.epochs=3", "trainer.log_every_s=0",
            f"hydra.sweep.dir={tmp_path}"]
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(["advtrain", *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    for line in proc.stdout:  # the second job (pgd) is in its second epoch: stop the sweep
        if "epoch 2/3 batch" in line and (tmp_path / "0_natural_synthetic_seed0" / "results.json").exists():
            proc.send_signal(signal.SIGTERM)
            break
    proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    first = (tmp_path / "0_natural_synthetic_seed0" / "results.json").read_text()
    assert not (tmp_path / "1_pgd_synthetic_seed0" / "results.json").exists()

    again = run_cli(args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "already finished" in again.stdout and "resumed from" in again.stdout
    assert (tmp_path / "0_natural_synthetic_seed0" / "results.json").read_text() == first  # not redone
    assert json.loads((tmp_path / "1_pgd_synthetic_seed0" / "results.json").read_text())["epochs_run"] == 3
