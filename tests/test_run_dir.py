"""A run directory survives its surroundings: one process at a time (flock), temp files of killed writes removed,
a full disk reported in one line with the previous checkpoint kept, files readable as the umask says, and a stop
signal outside the training loop reported like one inside it."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from advtrain.config import check_config
from advtrain.engine import checkpoint as checkpointing
from advtrain.engine import run as run_module
from advtrain.engine.atomic import atomic_write, is_disk_full, remove_stale_temps
from advtrain.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from advtrain.engine.rundir import RunDirBusy, exclusive, is_held_elsewhere
from advtrain.schema import TRAIN_SECTIONS
from conftest import TINY, compose_train, interrupt_after, run_cli


# --- the lock -------------------------------------------------------------------------------------------------------
def test_a_second_holder_is_refused_with_the_first_ones_pid(tmp_path):
    with exclusive(tmp_path):
        code = (f"from pathlib import Path; from advtrain.engine.rundir import exclusive\n"
                f"with exclusive(Path({str(tmp_path)!r})): pass")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0 and f"is in use by pid {os.getpid()}" in proc.stderr
    with exclusive(tmp_path):  # released when the holder let go
        pass


def test_the_kernel_releases_the_lock_of_a_killed_holder(tmp_path):
    code = (f"import threading; from pathlib import Path; from advtrain.engine.rundir import exclusive\n"
            f"with exclusive(Path({str(tmp_path)!r})):\n"
            f"    print('held', flush=True); threading.Event().wait()")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert is_held_elsewhere(tmp_path)
        with pytest.raises(RunDirBusy, match=f"in use by pid {holder.pid}"):
            with exclusive(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait()
    with exclusive(tmp_path):
        pass


@pytest.mark.slow
def test_a_second_command_on_a_held_run_dir_exits_2_and_leaves_the_folder(tmp_path):
    run_dir = tmp_path / "run"
    with exclusive(run_dir):
        (run_dir / "checkpoints").mkdir()
        (run_dir / "checkpoints" / "keep.txt").write_text("the first run's")
        (run_dir / ".hydra").mkdir()
        record = {name: f"the first run's {name}".encode() for name in ("config.yaml", "hydra.yaml", "overrides.yaml")}
        for name, text in record.items():
            (run_dir / ".hydra" / name).write_bytes(text)
        proc = run_cli([*TINY, "trainer.epochs=5", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    # Hydra's record of the job is the holder's still: the refused command wrote none of its own.
    assert {p.name: p.read_bytes() for p in (run_dir / ".hydra").iterdir()} == record
    assert proc.stderr.strip() == (f"advtrain: error: {run_dir} is in use by pid {os.getpid()} (another advtrain is "
                                   "training in this run directory; wait for it, stop it, or choose another "
                                   "hydra.run.dir)")
    assert (run_dir / "checkpoints" / "keep.txt").read_text() == "the first run's"
    assert not (run_dir / "results.json").exists()


@pytest.mark.slow
def test_a_sweep_skips_a_job_whose_folder_is_held(tmp_path):
    sweep = tmp_path / "sweep"
    with exclusive(sweep / "job0"):
        proc = run_cli(["-m", *TINY, "trainer.epochs=1", "seed=0,1", f"hydra.sweep.dir={sweep}",
                        "hydra.sweep.subdir=job${hydra.job.num}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"skipped: {sweep / 'job0'} is in use by pid {os.getpid()}" in proc.stderr
    assert not (sweep / "job0" / "results.json").exists() and (sweep / "job1" / "results.json").is_file()


# --- atomic writes --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_written_files_take_the_umask_s_permissions(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "results.json", lambda f: f.write(b"{}"))
        save_checkpoint({"model": {}}, tmp_path / "last.pt")
    finally:
        os.umask(old)
    assert (tmp_path / "results.json").stat().st_mode & 0o777 == mode
    assert (tmp_path / "last.pt").stat().st_mode & 0o777 == mode


def _fill_disk_after(limit: int):
    """torch.save onto a disk that fills up after `limit` bytes, as a real ENOSPC write failure."""
    plain = torch.save

    def save(obj, f, *args, **kwargs):
        class Full:
            written = 0

            def write(self, data):
                self.written += len(data)
                if self.written > limit:
                    raise OSError(errno.ENOSPC, "No space left on device")
                return f.write(data)

            def __getattr__(self, name):
                return getattr(f, name)

        return plain(obj, Full(), *args, **kwargs)

    return save


def test_a_checkpoint_write_on_a_full_disk_keeps_the_previous_one_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(3)}}, path)
    monkeypatch.setattr(torch, "save", _fill_disk_after(100))
    with pytest.raises(Exception) as caught:
        save_checkpoint({"model": {"w": torch.zeros(10000)}}, path)
    assert is_disk_full(caught.value)
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_a_full_disk_mid_run_is_one_line_naming_the_kept_checkpoint(tmp_path, monkeypatch):
    cfg = check_config(compose_train([*TINY, "trainer.epochs=3"]), TRAIN_SECTIONS)
    plain = checkpointing.save_checkpoint
    calls = []

    def save_until_full(state, path):
        calls.append(path)
        if len(calls) == 2:  # epoch 2's checkpoint
            with monkeypatch.context() as m:
                m.setattr(torch, "save", _fill_disk_after(1000))
                plain(state, path)
        plain(state, path)

    monkeypatch.setattr(checkpointing, "save_checkpoint", save_until_full)
    with pytest.raises(CheckpointError) as caught:
        run_module.train(cfg, tmp_path)
    last = tmp_path / "checkpoints" / "last.pt"
    assert str(caught.value) == f"no space left on device writing {last}; the checkpoint {last} (after epoch 1) is kept"
    assert load_checkpoint(last)["loop"]["epoch"] == 1
    assert sorted(p.name for p in last.parent.iterdir()) == ["epoch_0001.pt", "last.pt"]  # no temporary file


def test_stale_temp_files_of_killed_writes_are_removed_when_a_run_starts(tmp_path):
    cfg = check_config(compose_train([*TINY, "trainer.epochs=1", "attack=[]"]), TRAIN_SECTIONS)
    (tmp_path / "checkpoints").mkdir()
    stale = [tmp_path / "checkpoints" / ".last.pt.k2j3h4.tmp", tmp_path / ".results.json.x8d7.tmp",
             tmp_path / ".results.abc.tmp"]
    for path in stale:
        path.write_bytes(b"half a file")
    keep = tmp_path / "checkpoints" / "notes.tmp"  # not one of ours: names without the leading dot stay
    keep.write_text("mine")
    run_module.train(cfg, tmp_path)
    assert not any(p.exists() for p in stale) and keep.exists()
    assert (tmp_path / "results.json").is_file()
    assert remove_stale_temps(tmp_path, tmp_path / "checkpoints") == []


# --- stop signals outside the loop ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_final_evaluation_stopped_by_sigterm_goes_on_from_its_last_batch(tmp_path):
    """The rerun attacks only the batches not done before and ends with the numbers of an evaluation left alone."""
    args = [*TINY, "trainer.epochs=1", "attack.pgd20.steps=300", "eval.batch_size=16"]  # 8 batches of 16
    straight = run_cli([*args, f"hydra.run.dir={tmp_path / 'straight'}"], cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr
    run_dir = tmp_path / "run"
    proc = interrupt_after([*args, f"hydra.run.dir={run_dir}"], tmp_path, "eval: 32 examples")
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    last = run_dir / "checkpoints" / "last.pt"
    assert proc.stderr.strip() == (
        f"advtrain: stopped by SIGTERM during the final evaluation (its progress is kept in eval_progress.pt); the "
        f"checkpoint {last} (finished) stands; to continue, rerun the command (a sweep finds its folders again; a "
        f"single run needs hydra.run.dir={run_dir}): resume=auto, the default, picks it up")
    assert (run_dir / "eval_progress.pt").is_file() and not (run_dir / "results.json").exists()

    rerun = run_cli([*args, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    resumed = [line for line in rerun.stdout.splitlines() if "evaluation resumed from eval_progress.pt" in line]
    assert len(resumed) == 1 and "eval: 16 examples" not in rerun.stdout, rerun.stdout  # batch 1 was not redone
    results = [json.loads((d / "results.json").read_text())["eval"] for d in (tmp_path / "straight", run_dir)]
    assert results[0] == results[1]  # (that the RNG state carries over, tests/test_evaluate.py checks)
    assert not (run_dir / "eval_progress.pt").exists()


# --- Ctrl-C ---------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ctrl_c_checkpoints_mid_epoch_exits_130_in_one_line_and_resumes(tmp_path):
    run_dir = tmp_path / "run"
    args = [*TINY, "trainer.epochs=3", "trainer.log_every_s=0", f"hydra.run.dir={run_dir}"]
    proc = interrupt_after(args, tmp_path, "epoch 2/3 batch 3/", signum=signal.SIGINT)
    assert proc.returncode == 130, proc.stderr
    last = run_dir / "checkpoints" / "last.pt"
    assert proc.stderr.strip().startswith(f"advtrain: stopped by SIGINT; checkpoint written to {last}")
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    loop = load_checkpoint(last)["loop"]
    assert (loop["epoch"], loop["finished"]) == (1, False) and loop["batch"] > 0  # mid-epoch, not lost

    rerun = run_cli(args, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert "resumed from" in rerun.stdout and (run_dir / "results.json").is_file()


def test_a_second_ctrl_c_stops_at_once():
    from advtrain.engine.signals import catch_signals

    before = signal.getsignal(signal.SIGINT)  # Python's default_int_handler, or SIG_IGN under a shell's `&`
    with catch_signals(signal.SIGINT) as flag:
        os.kill(os.getpid(), signal.SIGINT)
        assert flag.signum == signal.SIGINT  # the first: a flag for the loop, which checkpoints at its next step
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before  # the handler from before, restored
