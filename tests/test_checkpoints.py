"""Checkpoints that are verified, kept in history and never silently wrong; the run directory's lock that follows no
link; the end of a run on a full disk; a stop signal while a run starts."""
from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import time

import pytest
import torch

from advtrain import load_model
from advtrain.config import check_config
from advtrain.data import DatasetInfo
from advtrain.engine import eval_progress
from advtrain.engine import run as run_module
from advtrain.engine.checkpoint import Checkpoint, RunCheckpoints, content_digest, load_checkpoint, save_checkpoint
from advtrain.engine.distributed import SINGLE
from advtrain.engine.network import model_from_checkpoint
from advtrain.engine.rundir import exclusive
from advtrain.errors import CheckpointError, ConfigError
from advtrain.schema import TRAIN_SECTIONS
from conftest import SYNTH, compose_train, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

RUN = [*SYNTH, "dataset.n_train=256", "trainer.batch_size=64", "trainer.epochs=3", "trainer.deterministic=true"]


def _cfg(*extra: str):
    return check_config(compose_train([*RUN, *extra]), TRAIN_SECTIONS)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 3-epoch run directory (keep_checkpoints=2, the default)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    run_dir = tmp_path_factory.mktemp("trained")
    run_module.train(_cfg(), run_dir)
    torch.set_num_threads(threads)
    return run_dir


def _flip_in_weights(src, dst) -> None:
    """A copy of checkpoint `src` with one bit flipped inside the bytes of its largest weight tensor."""
    data = bytearray(src.read_bytes())
    weights = load_checkpoint(src)["model"]
    largest = max(weights.values(), key=lambda t: t.numel())
    at = bytes(data).find(largest.reshape(-1).view(torch.uint8).numpy().tobytes())
    assert at > 0
    data[at + largest.numel() * largest.element_size() // 2] ^= 0x10
    dst.write_bytes(bytes(data))


# --- verified on every load -----------------------------------------------------------------------------------------
def test_no_flipped_bit_is_loaded_silently(trained, tmp_path):
    """Every single-bit flip is either refused in one line naming the file or changes nothing the file holds."""
    last = trained / "checkpoints" / "last.pt"
    data, original = last.read_bytes(), content_digest(load_checkpoint(last))
    damaged, refused = tmp_path / "last.pt", 0
    for at in random.Random(0).sample(range(len(data)), 60):
        flipped = bytearray(data)
        flipped[at] ^= 1 << random.Random(at).randrange(8)
        damaged.write_bytes(bytes(flipped))
        try:
            state = load_checkpoint(damaged)
        except CheckpointError as e:
            assert str(damaged) in str(e) and "\n" not in str(e)
            refused += 1
            continue
        assert content_digest(state) == original, at  # padding or zip bookkeeping torch never reads back
    assert refused >= 30


def test_every_loader_refuses_a_damaged_checkpoint_naming_it(trained, tmp_path):
    damaged = tmp_path / "damaged.pt"
    _flip_in_weights(trained / "checkpoints" / "last.pt", damaged)
    torch.load(damaged, weights_only=True)  # torch itself reads it without a word
    expected = f"checkpoint {damaged} is damaged: its contents do not match the digest written with it"
    with pytest.raises(CheckpointError, match="is damaged") as caught:
        load_model(damaged)
    assert str(caught.value).startswith(expected)
    with pytest.raises(CheckpointError, match="is damaged"):
        RunCheckpoints(tmp_path / "run", SINGLE).resume_state(_cfg(f"resume={damaged}"))
    info = DatasetInfo(name="synthetic", num_classes=10, shape=(1, 28, 28), mean=(0.0,), std=(1.0,), n_train=0,
                       n_val=0, n_test=0)
    with pytest.raises(CheckpointError, match=f"the method's teacher model: {expected}"):
        run_module.load_companion("teacher", str(damaged), info, torch.device("cpu"))


def test_checkpoints_written_before_digests_still_load_without_a_warning(trained, tmp_path, recwarn):
    state = load_checkpoint(trained / "checkpoints" / "last.pt")
    old = {**{k: v for k, v in state.items() if k != "digest"}, "format": 1}
    torch.save(old, tmp_path / "old.pt")
    _, model = model_from_checkpoint(Checkpoint.load(tmp_path / "old.pt"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state["model"].items())
    assert not [w for w in recwarn if "advtrain" in str(w.filename)]


@pytest.mark.parametrize("key", ["config", "loop", "model_spec"])
def test_a_checkpoint_missing_a_part_is_one_line(trained, tmp_path, key):
    state = load_checkpoint(trained / "checkpoints" / "last.pt")
    del state[key]
    save_checkpoint(state, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError) as caught:
        load_model(tmp_path / "partial.pt")
    assert str(caught.value) == (f"checkpoint {tmp_path / 'partial.pt'} is incomplete: it lacks '{key}' (it was not "
                                 "written by advtrain's training)")


def test_a_checkpoint_naming_an_unknown_arch_is_one_line(trained, tmp_path):
    state = load_checkpoint(trained / "checkpoints" / "last.pt")
    state["model_spec"]["arch"]["name"] = "resnet9000"
    save_checkpoint(state, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="records a model this advtrain cannot rebuild .*resnet9000"):
        load_model(tmp_path / "foreign.pt")


class _Payload:
    def __reduce__(self):
        return os.system, ("true",)


def test_a_code_carrying_checkpoint_names_what_it_would_call_and_never_suggests_running_it(tmp_path):
    torch.save({"format": 2, "model": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(tmp_path / "evil.pt")
    message = str(caught.value)
    assert "system" in message and "weights_only=False" not in message and "\n" not in message


# --- kept in history ------------------------------------------------------------------------------------------------
def test_the_newest_epochs_are_kept_beside_last_pt_as_links(trained):
    folder = trained / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["epoch_0002.pt", "epoch_0003.pt", "last.pt"]
    assert os.path.samefile(folder / "epoch_0003.pt", folder / "last.pt")  # no second copy of the bytes
    assert load_checkpoint(folder / "epoch_0002.pt")["loop"]["epoch"] == 2


def test_a_run_started_over_drops_the_epochs_of_the_run_it_replaces(tmp_path):
    run_module.train(_cfg(), tmp_path)
    run_module.train(_cfg("trainer.epochs=1", "resume=never"), tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch_0001.pt", "last.pt"]


def test_keep_checkpoints_0_keeps_last_pt_alone(tmp_path):
    run_module.train(_cfg("trainer.epochs=2", "trainer.keep_checkpoints=0"), tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.pt"]


def test_a_damaged_last_pt_resumes_from_the_newest_good_epoch_and_ends_as_a_straight_run(trained, tmp_path,
                                                                                           capsys):
    run_dir = tmp_path / "run"
    run_module.train(_cfg(), run_dir)
    last = run_dir / "checkpoints" / "last.pt"
    _flip_in_weights(last, tmp_path / "damaged.pt")
    with open(last, "r+b") as f:  # the disk damages the file in place: epoch_0003.pt, the same file, with it
        f.write((tmp_path / "damaged.pt").read_bytes())
    capsys.readouterr()
    run_module.train(_cfg(), run_dir)
    out = capsys.readouterr().out
    assert f"warning: checkpoint {last} is damaged" in out
    assert f"continuing from {run_dir / 'checkpoints' / 'epoch_0002.pt'} (after epoch 2)" in out
    straight, resumed = (load_checkpoint(d / "checkpoints" / "last.pt")["model"] for d in (trained, run_dir))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_with_no_good_checkpoint_left_the_rerun_says_how_to_start_over(trained, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    _flip_in_weights(trained / "checkpoints" / "last.pt", run_dir / "checkpoints" / "last.pt")
    with pytest.raises(CheckpointError, match="no other checkpoint of this run verifies: to start this run over "
                                              "instead, rerun with resume=never"):
        run_module.train(_cfg(), run_dir)


# --- the lock -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("link", ["symlink", "dangling symlink", "hard link"])
def test_a_planted_lock_link_is_refused_and_its_target_untouched(tmp_path, link):
    run_dir, victim = tmp_path / "run", tmp_path / "victim.txt"
    run_dir.mkdir()
    if link != "dangling symlink":
        victim.write_text("precious")
    (os.link if link == "hard link" else os.symlink)(victim, run_dir / ".lock")
    with pytest.raises(ConfigError, match=f"{run_dir / '.lock'} is a (symbolic|hard) link; advtrain's run lock"):
        with exclusive(run_dir):
            pass
    assert victim.read_text() == "precious" if link != "dangling symlink" else not victim.exists()


@pytest.mark.slow
def test_advtrain_eval_never_writes_into_a_held_or_a_training_run_s_folder(trained, tmp_path):
    checkpoint = trained / "checkpoints" / "last.pt"
    held = tmp_path / "held"
    with exclusive(held):
        proc = run_cli([f"checkpoint={checkpoint}", "attack=[]", f"hydra.run.dir={held}"], cwd=tmp_path,
                       program="advtrain-eval")
    assert proc.returncode == 2 and proc.stderr.strip().startswith(f"advtrain-eval: error: {held} is in use by pid")
    assert sorted(p.name for p in held.iterdir()) == [".lock"]

    before = (trained / "results.json").read_bytes()
    proc = run_cli([f"checkpoint={checkpoint}", "attack=[]", f"hydra.run.dir={trained}"], cwd=tmp_path,
                   program="advtrain-eval")
    assert proc.returncode == 2 and "is a training run's folder" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and (trained / "results.json").read_bytes() == before


# --- the end of a run -----------------------------------------------------------------------------------------------
def test_a_full_disk_during_the_final_evaluation_is_one_line_and_the_rerun_goes_on(tmp_path, monkeypatch, capsys):
    cfg = _cfg("trainer.epochs=1", "attack=[pgd20]", "attack.pgd20.steps=2", "eval.batch_size=16", "eval.n=64")
    run_module.train(cfg, tmp_path / "straight")
    plain, saves = eval_progress.atomic_write, []

    def fill_up(path, write):
        saves.append(path)
        if len(saves) == 3:  # the third batch's progress meets a full disk
            raise OSError(errno.ENOSPC, "No space left on device")
        plain(path, write)

    monkeypatch.setattr(eval_progress, "atomic_write", fill_up)
    run_dir = tmp_path / "run"
    with pytest.raises(CheckpointError) as caught:
        run_module.train(cfg, run_dir)
    progress = run_dir / "eval_progress.pt"
    assert str(caught.value) == (f"no space left on device writing {progress}; the evaluation's progress up to its "
                                 f"last finished batch is kept in {progress}: free some space and rerun the command "
                                 "to continue it")
    monkeypatch.undo()
    capsys.readouterr()
    results = run_module.train(cfg, run_dir)
    assert "evaluation resumed from eval_progress.pt: 32 examples already evaluated" in capsys.readouterr().out
    assert results["eval"] == json.loads((tmp_path / "straight" / "results.json").read_text())["eval"]


@pytest.mark.slow
def test_ctrl_c_while_a_run_starts_is_one_line_exit_130_and_leaves_no_folder(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(["advtrain", *RUN, f"hydra.run.dir={run_dir}"], cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not run_dir.exists():  # Hydra made the run folder: the job has begun, torch is still to be imported
        try:  # wait on the process: one that ends before making its folder fails here at once
            proc.wait(timeout=0.01)
        except subprocess.TimeoutExpired:
            assert time.monotonic() < deadline, "the run never made its folder"
            continue
        pytest.fail(f"the run ended before making its folder: {proc.communicate()}")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().startswith("advtrain: stopped by SIGINT while starting up") and len(err.splitlines()) == 1
    assert "interrupted again" not in err and not run_dir.exists()
