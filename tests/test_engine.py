"""Engine pieces: atomic and safe checkpoints, FGSM-RS's guard, FREE's persistent delta, precisions, data paths."""
from __future__ import annotations

import os

import pytest
import torch
from PIL import Image
from torch import nn

from advtrain.attacks import PassCounter
from advtrain.config import check_config
from advtrain.schema import TRAIN_SECTIONS
from advtrain.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from advtrain.engine.run import train
from advtrain.methods import build_method
from conftest import compose_train, make_context
from test_data import write_cifar10

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: 1 thread, restored afterwards


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(3)}}, path)

    def crash(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # the process dies mid-write

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"model": {"w": torch.zeros(3)}}, path)
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


class _Payload:
    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_never_executes_code(tmp_path):
    marker = tmp_path / "pwned"
    _Payload.marker = marker
    evil = tmp_path / "evil.pt"
    torch.save({"format": 1, "model": _Payload()}, evil)
    with pytest.raises(CheckpointError, match="cannot be read safely"):
        load_checkpoint(evil)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def _no_autocast():
    return torch.autocast("cpu", enabled=False)


# FGSM-RS's guard (and every single-step method's): tests/test_overfitting_guard.py


def test_free_keeps_delta_across_minibatches_inside_the_ball():
    from advtrain.data import Batch

    cfg = check_config(compose_train(["method=free", "dataset=synthetic", "method.replays=3"]), TRAIN_SECTIONS)
    method = build_method(cfg.method, None)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    ctx = make_context(model, autocast=_no_autocast)
    eps = cfg.method.eps
    deltas = []
    for step in range(3):
        x, y = torch.rand(8, 1, 4, 4), torch.randint(0, 3, (8,))
        n = 8 if step < 2 else 5  # a short last batch uses the buffer's first rows
        method.train_step(Batch(x[:n], y[:n], torch.arange(n), None, None), ctx)
        deltas.append(method.delta.clone())
        assert method.delta.abs().max() <= eps + 1e-7
        assert ((x[:n] + method.delta[:n]) >= 0).all() and ((x[:n] + method.delta[:n]) <= 1).all()
    assert ctx.updates == 9 and ctx.counter.total == 3 * (8 + 8 + 5)
    assert deltas[0].abs().sum() > 0 and not torch.equal(deltas[0], deltas[1])
    assert torch.equal(deltas[2][5:], deltas[1][5:])  # rows a short batch did not use are kept for the next one


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_trains(tmp_path, precision):
    cfg = check_config(compose_train([
        "dataset=synthetic", "arch=mnist_net", "dataset.n_train=512",  # CPU fp16 convolutions are slow: keep it small
        "dataset.n_test=64", "method=pgd", "method.steps=2", "logger=none", "trainer.epochs=2",
        f"trainer.precision={precision}", "trainer.progress=off", "attack=[fgsm]", "optim=adam",
        "optim.lr=1e-3", "schedule=constant"]), TRAIN_SECTIONS)
    results = train(cfg, tmp_path)
    assert results["precision"] == precision
    assert results["history"][1]["train/loss"] < results["history"][0]["train/loss"]
    if precision == "fp16":
        assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["scaler"]["scale"] > 0


def test_cifar10_files_train_end_to_end(tmp_path):
    write_cifar10(tmp_path / "data")
    cfg = check_config(compose_train([
        "dataset=cifar10", f"dataset.root={tmp_path / 'data'}", "dataset.check_md5=false", "dataset.download=false",
        "arch=preact_resnet18", "method=pgd", "method.steps=1", "logger=none", "trainer.epochs=1",
        "trainer.batch_size=8", "trainer.progress=off", "attack=[pgd20]"]), TRAIN_SECTIONS)
    results = train(cfg, tmp_path / "run")
    assert results["dataset"] == "cifar10" and results["eval"]["n"] == 3
    assert results["passes_per_example"] == pytest.approx(2.0)


def test_imagefolder_trains_and_validation_split_is_monitored(tmp_path):
    for split, n in (("train", 12), ("val", 4)):
        for label in ("cat", "dog"):
            folder = tmp_path / "images" / split / label
            folder.mkdir(parents=True)
            for i in range(n):
                shade = 40 if label == "cat" else 200
                Image.new("RGB", (40, 40), (shade + i, shade, shade)).save(folder / f"{i}.png")
    cfg = check_config(compose_train([
        "dataset=imagefolder", f"dataset.root={tmp_path / 'images'}", "dataset.image_size=32", "dataset.workers=0",
        "dataset.val_size=4", "arch=resnet18", "method=natural", "logger=none", "trainer.epochs=2",
        "trainer.batch_size=8", "trainer.progress=off", "attack=[fgsm]", "eval.every=1", "eval.every_n=4"]),
        TRAIN_SECTIONS)
    results = train(cfg, tmp_path / "run")
    assert results["eval"]["n"] == 8 and set(results["eval"]) == {"n", "clean", "fgsm"}
    monitored = results["history"][0]
    assert "eval/clean" in monitored and "eval/fgsm" in monitored and monitored["eval/n"] == 4
    best = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")  # selected on the validation split
    assert best["loop"]["best_val_score"] == monitored["eval/fgsm"] and best["loop"]["epoch"] == 1


def _loop_parts(epochs: int = 2):
    """A real model, optimizer and loader for `run_epochs` (8 batches per epoch), built the way `advtrain` builds
    them."""
    from advtrain.engine.precision import resolve_runtime
    from advtrain.engine.run import build_context, build_parts
    overrides = ["method=natural", "dataset=synthetic", "arch=mnist_net", "logger=none", f"trainer.epochs={epochs}",
                 "trainer.batch_size=64", "dataset.n_train=512"]
    cfg = check_config(compose_train(overrides), TRAIN_SECTIONS)
    parts = build_parts(cfg, resolve_runtime(cfg.trainer, 0))
    ctx = build_context(cfg, parts, PassCounter())
    parts.method.setup(ctx)
    return cfg, parts, ctx


def _run_loop(cfg, parts, ctx, state):
    from advtrain.engine.loop import LoopSettings, run_epochs
    from advtrain.logging.console import TrainProgress
    saved, records = [], []

    def save(s):
        saved.append({k: (v.copy() if isinstance(v, (dict, list)) else v) for k, v in vars(s).items()})
        return "last.pt"

    progress = TrainProgress(cfg.trainer.epochs, len(parts.data.train), "off", 0)
    run_epochs(ctx, parts.method, parts.data.train, LoopSettings.of(cfg), state, progress=progress, save=save,
               on_epoch=records.append, periodic_eval=None)
    return saved, records


def test_a_signal_on_an_epochs_last_batch_checkpoints_after_the_epoch_record():
    import signal
    from advtrain.engine.loop import LoopState
    from advtrain.engine.signals import Interrupted
    cfg, parts, ctx = _loop_parts()
    assert len(parts.data.train) == 8
    step = parts.method.train_step

    def signalled_on_last_batch(batch, ctx):
        if ctx.batch_idx == 7:
            signal.raise_signal(signal.SIGTERM)
        return step(batch, ctx)

    parts.method.train_step = signalled_on_last_batch
    state = LoopState()
    with pytest.raises(Interrupted):
        _run_loop(cfg, parts, ctx, state)
    # The checkpoint stands at the epoch boundary with the epoch recorded, not at batch 8 of 8 of epoch 1.
    assert (state.epoch, state.batch, len(state.history)) == (1, 0, 1)
    assert state.partial_n == 0 and not state.finished


def test_resume_with_no_batch_left_in_the_epoch_records_it_and_goes_on():
    # Checkpoints written before the fix above could stop at the last batch of an epoch: resuming one ran no batch
    # and failed on the LR to record.
    from advtrain.engine.loop import LoopState
    cfg, parts, ctx = _loop_parts()
    for _ in parts.data.train.epoch(0):  # the loader as restored from such a checkpoint: epoch 1 fully drawn
        pass
    state = LoopState(epoch=0, batch=8, partial_sums={"loss": 512 * 1.5, "acc": 512 * 0.25}, partial_n=512,
                      train_time_s=4.0, partial_time_s=4.0)
    saved, records = _run_loop(cfg, parts, ctx, state)
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[0]["train/loss"] == pytest.approx(1.5) and records[0]["train/acc"] == pytest.approx(0.25)
    assert 0 < records[0]["lr"] <= cfg.optim.lr
    # The epoch's time and rate count the seconds before the checkpoint, not only the part after the resume.
    assert records[0]["epoch_time_s"] == pytest.approx(4.0, abs=0.5)
    assert records[0]["images_per_s"] == pytest.approx(512 / records[0]["epoch_time_s"])
    assert state.finished and saved[-1]["epoch"] == 2
