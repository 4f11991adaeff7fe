"""Sweeps: stable sweep folders (also inside each job), one W&B group per sweep, and GPU claims for parallel jobs."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time

import pytest
from conftest import REPO, TINY, run_cli
from hydra import initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf
from wandb.proto import wandb_internal_pb2 as pb
from wandb_records import _chunks

from advtrain import sweep, sweep_callback
from advtrain.engine import rundir
from advtrain.logging import wandb_logger


def test_sweep_name_is_stable_readable_and_distinct():
    a = sweep.sweep_name(["seed=0,1", "method=pgd,fgsm_rs", "dataset=cifar10"])
    # Swept overrides first, then fixed ones; a config group reads as its choice. Pinned: a different name for the
    # same command would start a user's half-done sweep over in a new folder.
    assert a == "pgd-fgsm_rs__seed0-1__cifar10-dd486b61"
    # Order, Hydra's own overrides and resume=auto do not change which sweep it is.
    assert sweep.sweep_name(["dataset=cifar10", "hydra/launcher=slurm", "method=pgd,fgsm_rs", "seed=0,1",
                             "hydra.launcher.partition=gpu", "resume=auto"]) == a
    assert sweep.sweep_name(["seed=0,2", "method=pgd,fgsm_rs", "dataset=cifar10"]) != a
    # Two lists that read alike once made safe for a file name still get two folders.
    slash, underscore = sweep.sweep_name(["dataset.root=/d/x"]), sweep.sweep_name(["dataset.root=_d_x"])
    assert slash != underscore and "/" not in slash
    assert sweep.sweep_name([]) == sweep.sweep_name(["hydra.sweep.dir=x"]) == "default"


SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@pytest.mark.parametrize("overrides", [
    ["method=pgd,fgsm_rs,trades,natural,awp,free,oat,oats,rat,deat", "seed=range(0,10)"],
    [f"+k{i}=" + "v" * 30 for i in range(10)] + ["attack=[pgd20,autoattack]"],
    ["dataset.root='/data/my sets/cifar'", "optim.lr=0.1,0.05", "+trainer.note={a: 1}", "~eval.n", ".x=1"],
    ["attack=[]", "method=pgd,trades"],
])
def test_sweep_name_is_short_and_safe_for_files_and_overrides(overrides):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    name = sweep.sweep_name(overrides)
    assert len(name) <= sweep.READABLE_CHARS + 9 and SAFE_NAME.fullmatch(name), name
    # Neither `=` nor `,`: the folder goes back into an override unquoted, not read as a sweep.
    (parsed,) = OverridesParser.create().parse_overrides([f"checkpoint=multirun/{name}/0_pgd/last.pt"])
    assert parsed.value() == f"multirun/{name}/0_pgd/last.pt"
    assert sweep.sweep_name(list(reversed(overrides))) == name


def test_sweeps_that_differ_past_the_readable_part_get_their_own_folders():
    base = ["method=pgd,trades", "seed=0,1,2", "dataset=cifar10", "arch=wrn34_10"]
    names = {sweep.sweep_name([*base, f"dataset.root=/data/{tail}"]) for tail in ("a", "b")}
    assert len(names) == 2
    assert {n[:-9] for n in names} == {"pgd-trades__seed0-1-2__wrn34_10__cifar10"}  # the same first 40 characters


def test_every_job_resolves_the_sweeps_folder_not_one_of_its_own():
    # What each launcher does: the master config names the sweep dir, and each job's config is recomposed from
    # that job's overrides alone (hydra.overrides.task differs), keeping the master's resolver cache.
    overrides = ["method=natural,pgd", "seed=0,1", "logger=none"]
    with initialize_config_module(config_module="advtrain.conf", version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        master = loader.load_configuration("train", overrides, run_mode=RunMode.MULTIRUN)
        expected = f"multirun/{sweep.sweep_name(overrides)}"
        assert master.hydra.sweep.dir == expected
        for job in (["method=natural", "seed=0", "logger=none"], ["method=pgd", "seed=1", "logger=none"]):
            job_cfg = loader.load_sweep_config(master, job)
            assert list(job_cfg.hydra.overrides.task) == job
            assert job_cfg.hydra.sweep.dir == expected


def test_sweep_summary_names_the_folder_counts_its_jobs_and_says_how_to_compare_them(tmp_path, monkeypatch):
    folder = tmp_path / "multirun" / "pgd-trades__seed0-1-0123abcd"
    for job in ("0_pgd", "1_trades", "2_pgd", "3_trades"):
        (folder / job).mkdir(parents=True)
        (folder / job / ".lock").touch()
    (folder / "0_pgd" / "results.json").write_text("{}")
    (folder / "1_trades" / "results.json").write_text("{}")
    for other in (".gpu_locks/gpu0.lock", ".submitit/1/1_result.pkl"):  # launchers' files are no jobs
        (folder / other).parent.mkdir(parents=True)
        (folder / other).touch()
    monkeypatch.chdir(tmp_path)
    with rundir.exclusive(folder / "3_trades"):  # a rerun skipped the job another process trains
        lines = sweep_callback.summary_lines(folder.resolve())
    assert lines == ["sweep folder: multirun/pgd-trades__seed0-1-0123abcd (4 jobs: 2 finished, "
                     "1 running in another process, 1 without results)",
                     "compare the runs: advtrain-report multirun/pgd-trades__seed0-1-0123abcd"]
    elsewhere = tmp_path / "my sweeps"  # outside the working directory: as given, quoted for the shell
    (elsewhere / "0_pgd").mkdir(parents=True)
    (elsewhere / "0_pgd" / "results.json").write_text("{}")
    monkeypatch.chdir(folder)
    assert sweep_callback.summary_lines(elsewhere) == [f"sweep folder: {elsewhere} (1 job: 1 finished)",
                                                       f"compare the runs: advtrain-report '{elsewhere}'"]


def _assert_ends_with_the_summary(stdout: str, shown: str, jobs: int) -> None:
    assert stdout.splitlines()[-2:] == [f"sweep folder: {shown} ({jobs} jobs: {jobs} finished)",
                                        f"compare the runs: advtrain-report {shown}"], stdout[-2000:]


@pytest.fixture
def joblib_job(tmp_path, monkeypatch):
    """Make this process look like a job of `hydra/launcher=parallel` whose sweep folder is tmp_path."""
    previous = HydraConfig.instance().cfg

    def start(gpus: int, *overrides: str):
        monkeypatch.setattr(sweep, "visible_gpus", lambda: gpus)
        with initialize_config_module(config_module="advtrain.conf", version_base="1.3"):
            loader = GlobalHydra.instance().config_loader()
            # hydra.mode=MULTIRUN is what `advtrain -m` adds to the overrides.
            cfg = loader.load_configuration("train", ["hydra/launcher=parallel", f"hydra.sweep.dir={tmp_path}",
                                                      "hydra.mode=MULTIRUN", *overrides], run_mode=RunMode.MULTIRUN)
        HydraConfig.instance().set_config(cfg)
        return cfg

    yield start
    HydraConfig.instance().cfg = previous


def test_parallel_launcher_runs_one_job_per_gpu_or_two_on_cpu(joblib_job):
    assert joblib_job(4).hydra.launcher.n_jobs == 4
    assert joblib_job(0).hydra.launcher.n_jobs == sweep.CPU_PARALLEL_JOBS


def test_claims_take_distinct_gpus_and_release_them(joblib_job, tmp_path):
    joblib_job(2)
    with sweep.claim_device() as first, sweep.claim_device() as second:
        assert (first, second) == (0, 1)
        assert sorted(p.name for p in (tmp_path / ".gpu_locks").iterdir()) == ["gpu0.lock", "gpu1.lock"]
    with sweep.claim_device() as again:
        assert again == 0  # joblib reuses workers: a finished job must not keep its GPU


def test_a_claim_waits_for_a_gpu_to_be_released(tmp_path):
    got = []
    with sweep.claim_gpu(tmp_path, 2) as a:
        with sweep.claim_gpu(tmp_path, 2):
            waiter = threading.Thread(target=lambda: got.append(_claim_once(tmp_path)))
            waiter.start()
            time.sleep(0.3)
            assert got == []  # both GPUs held: still waiting
        waiter.join(timeout=5)
        assert a == 0 and got == [1]


def _claim_once(lock_dir):
    with sweep.claim_gpu(lock_dir, 2, poll_s=0.05) as index:
        return index


def test_two_processes_claim_different_gpus(tmp_path):
    hold = ("import sys; from pathlib import Path; from advtrain.sweep import claim_gpu\n"
            f"with claim_gpu(Path({str(tmp_path)!r}), 2) as k:\n print(k, flush=True); sys.stdin.readline()")
    holder = subprocess.Popen([sys.executable, "-c", hold], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "0"
        with sweep.claim_gpu(tmp_path, 2) as mine:
            assert mine == 1
    finally:
        holder.communicate("\n", timeout=10)
    with sweep.claim_gpu(tmp_path, 2) as mine:
        assert mine == 0  # released when the other process let go


def test_no_claim_outside_a_parallel_sweep_or_with_one_gpu(joblib_job, monkeypatch):
    monkeypatch.setattr(sweep, "visible_gpus", lambda: 2)
    with sweep.claim_device() as device:  # no Hydra job at all, e.g. train() from a notebook
        assert device is None
    assert sweep.cpu_threads_per_job() is None
    joblib_job(1)
    with sweep.claim_device() as device:
        assert device is None


def test_cpu_threads_are_split_between_parallel_jobs(joblib_job, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    joblib_job(0, "hydra.launcher.n_jobs=3")
    assert sweep.cpu_threads_per_job() == 2
    joblib_job(0, "hydra.launcher.n_jobs=-1")  # joblib: as many jobs as CPUs
    assert sweep.cpu_threads_per_job() == 1


SMALL = ["trainer.epochs=1", "dataset.n_train=128", "dataset.n_test=64", "eval.n=32"]


def _run_record(path) -> pb.RunRecord:
    for raw in _chunks(path):
        record = pb.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "run":
            return record.run
    raise AssertionError(f"no run record in {path}")


def test_a_run_directory_keeps_its_wandb_id(tmp_path):
    first = wandb_logger.run_id(tmp_path / "a")
    assert wandb_logger.run_id(tmp_path / "a") == first  # a resumed run continues its W&B run
    assert wandb_logger.run_id(tmp_path / "b") != first


def test_wandb_group_is_the_sweep_folder_only_inside_a_multirun(joblib_job, tmp_path):
    assert wandb_logger.sweep_group() is None  # no Hydra job, e.g. train() called from a test
    joblib_job(0)
    assert wandb_logger.sweep_group() == tmp_path.name
    joblib_job(0, "hydra.mode=RUN")  # a single run never groups by a sweep folder it does not use
    assert wandb_logger.sweep_group() is None


@pytest.mark.slow
def test_sweep_jobs_land_in_the_sweeps_folder_and_share_a_wandb_group(tmp_path):
    args = ["-m", "method=natural,fgsm_rs", *[a for a in TINY if a != "logger=none"], "logger=wandb", *SMALL]
    proc = run_cli(args, cwd=tmp_path, timeout=180)
    assert proc.returncode == 0, proc.stderr
    # One folder named by the command alone, so the same command (or it with resume=auto) finds it again.
    (sweep_dir,) = (tmp_path / "multirun").iterdir()
    assert sweep_dir.name == sweep.sweep_name(args[1:])
    _assert_ends_with_the_summary(proc.stdout, f"multirun/{sweep_dir.name}", 2)
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [p.name for p in jobs] == ["0_natural_synthetic_seed0", "1_fgsm_rs_synthetic_seed0"]
    runs = []
    for job in jobs:
        assert (job / "results.json").is_file()
        (run_file,) = job.glob("wandb/offline-run-*/run-*.wandb")
        runs.append(_run_record(run_file))
        assert runs[-1].run_id == (job / wandb_logger.RUN_ID_FILE).read_text().strip()
    assert [r.run_group for r in runs] == [sweep_dir.name] * 2
    assert runs[0].run_id != runs[1].run_id


@pytest.mark.slow
def test_parallel_launcher_runs_the_jobs_in_joblib_workers(tmp_path):
    proc = run_cli(["-m", "hydra/launcher=parallel", "hydra.launcher.n_jobs=2", "method=natural,pgd", *TINY,
                    *SMALL, f"hydra.sweep.dir={tmp_path}"], cwd=tmp_path, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert "Joblib.Parallel(n_jobs=2" in proc.stderr + proc.stdout
    _assert_ends_with_the_summary(proc.stdout, str(tmp_path), 2)  # after joblib's workers are done
    results = sorted(tmp_path.glob("*/results.json"))
    assert [json.loads(p.read_text())["method"] for p in results] == ["natural", "pgd"]
    saved = OmegaConf.load(results[0].parent / ".hydra" / "hydra.yaml")
    assert saved.hydra.launcher._target_ == sweep.JOBLIB_LAUNCHER


def test_the_method_table_preset_sweeps_every_shipped_method_over_three_seeds():
    from advtrain.methods import shipped

    params = OmegaConf.load(REPO / "advtrain" / "conf" / "experiment" / "fashion_mnist_methods.yaml").hydra.sweeper.params
    methods = params.method.split(",")
    assert sorted(methods) == shipped() and methods[0] == "pgd" and methods[-1] == "rrm"  # the teacher first
    assert params.seed == "0,1,2"


@pytest.mark.slow
def test_the_method_table_sweep_runs_every_method_and_rrm_learns_from_its_pgd_run(tmp_path):
    """The preset's sweep, one seed on tiny synthetic data: a job per method in <method>_seed<seed>, OAT and OATS
    evaluated at the ends of their trade-off only, RRM's teacher the same seed's PGD-AT model of this sweep."""
    sweep_dir = tmp_path / "table"
    proc = run_cli(["-m", "experiment=fashion_mnist_methods", *[a for a in TINY if a != "arch=mnist_net"],
                    "dataset.train_subset=256", "eval.n=32",
                    "trainer.epochs=1", "hydra.sweeper.params.seed=0", f"hydra.sweep.dir={sweep_dir}"],
                   cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    from advtrain.methods import shipped

    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == sorted(f"{m}_seed0" for m in shipped())
    results = {m: json.loads((sweep_dir / f"{m}_seed0" / "results.json").read_text()) for m in shipped()}
    assert results["rrm"]["companions"]["teacher"]["checkpoint"] == f"{sweep_dir}/pgd_seed0/checkpoints/last.pt"
    assert list(results["oat"]["views"]) == ["lambda=0", "lambda=1"]
    assert list(results["oats"]["views"]) == ["width=1,lambda=0", "width=1,lambda=1", "width=0.5,lambda=0",
                                              "width=0.5,lambda=1"]
    assert results["pgd"]["config"]["method"]["steps"] == 10  # the yardstick: PGD-10 at step 2.5 eps / 10
    assert results["gaat"]["config"]["method"]["steps"] == 10


@pytest.mark.slow
def test_a_job_that_ends_a_sweep_says_where_the_sweep_stands(tmp_path):
    """The failing job's error stays one line on stderr; stdout ends with the sweep's folder, what it holds and
    how to go on, as a finished sweep's last lines say."""
    args = ["-m", "method=natural,rrm", *TINY, "attack=[]", "trainer.epochs=1", f"hydra.sweep.dir={tmp_path / 'sw'}"]
    proc = run_cli(args, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "needs method.teacher" in proc.stderr
    assert proc.stdout.rstrip().splitlines()[-3:] == [
        "sweep folder: sw (1 job: 1 finished)", "compare the runs: advtrain-report sw",
        "rerun the same command to go on: finished jobs are skipped, interrupted ones resume"]
