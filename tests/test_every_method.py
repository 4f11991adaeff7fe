"""Every shipped method (one YAML in advtrain/conf/method/, so a method added later is here by itself) trains a tiny
run in-process: the weights move and the loss stays finite, results.json's passes_per_example is the cost
docs/methods.md's table gives, and a run stopped mid-epoch and resumed ends bit-identical to one left alone.

The subprocess path of a stop (SIGTERM to `advtrain`, exit status, the resume=auto message) is method-independent and
lives in test_cli.py; here the signal is raised in-process at a chosen batch, as the loop would see it."""
from __future__ import annotations

import math
import signal

import pytest
import torch

from advtrain.engine import loop
from advtrain.engine.run import train
from advtrain.engine.signals import Interrupted
from advtrain.errors import ConfigError
from advtrain.methods import method_defaults, shipped
from conftest import SYNTH, checked

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: 1 thread, restored afterwards

EPOCHS, BATCH, N_TRAIN = 2, 64, 128  # 2 full batches an epoch
STOP_AT = (1, 0)  # (epoch, batch) after which the stopped run is signalled: mid-epoch, past an epoch boundary
TINY = [*SYNTH, f"dataset.n_train={N_TRAIN}", f"trainer.batch_size={BATCH}", f"trainer.epochs={EPOCHS}",
        "trainer.deterministic=true"]
STEPS = 2  # attack steps K of every method that has `steps`: the cost formulas below hold for any K

# Overrides beyond STEPS that keep a run tiny or that it needs. {teacher}: a finished PGD-AT checkpoint.
SETTINGS = {
    "free": ["method.replays=2"],
    "gaat": ["method.steps=4", "method.n_exact=2"],  # two exact steps and two Taylor-approximated ones
    "rrm": ["method.teacher={teacher}", "arch=madry_cnn"],  # features of another size: the projection trains too
}

# Variants whose cost or state differs from their method's defaults: AWP over TRADES and RAT over AWP, each with a
# warm-up epoch of the base alone before the weight perturbation starts, so the resume crosses that switch.
VARIANTS = {
    "awp-trades-warmup": ("awp", ["method.base=trades", "method.warmup_epochs=1"]),
    "rat-awp_trades-warmup": ("rat", ["method.base=awp_trades", "method.warmup_epochs=1"]),
}


def _oat(m, run) -> float:
    """1 + (1 - p0)(K + 1), with p0 the share ceil(p_zero B) / B of a full batch at lambda = 0."""
    p_zero = m.p_zero if m.p_zero is not None else 1 / len(m.lambdas)
    return 1 + (1 - math.ceil(p_zero * BATCH) / BATCH) * (m.steps + 1)


def _oats(m, run) -> float:
    """sum over widths w of r_w (OAT's cost), r_w = FLOPs(w) / FLOPs(1) as results.json's "flops" records them."""
    flops = {w: run["flops"][f"width={w:g},lambda=0"] for w in m.widths}
    return sum(flops[w] / flops[1.0] for w in m.widths) * _oat(m, run)


def _awp(m, run) -> float:
    """The base's cost, plus AWP's ascent in every epoch from warmup_epochs on (null: 0 over pgd, 10 over trades).
    AWP: base=pgd K + 1, ascent 1 (K + 2); base=trades K + 2 + 1/3, ascent 2 (K + 4 + 1/3). RAT: TRADES' K + 2 + 1/3
    (its terms add no pass); base=awp_trades adds TRADES-AWP's ascent of 2."""
    if m.name == "rat" and m.base == "trades":
        return m.steps + 2 + 1 / 3
    trades = m.base in ("trades", "awp_trades")
    warmup = m.warmup_epochs if m.warmup_epochs is not None else (10 if trades else 0)
    perturbed = max(EPOCHS - warmup, 0) / EPOCHS  # the share of epochs with the ascent
    return (m.steps + 2 + 1 / 3 + 2 * perturbed) if trades else (m.steps + 1 + perturbed)


# Passes per example of a run of TINY's settings, as docs/methods.md's table and each method's docstring give them:
# m is the run's method section, run its results.json. K = m.steps.
PASSES = {
    "natural": lambda m, run: 1,
    "pgd": lambda m, run: m.steps + 1,
    "fgsm_rs": lambda m, run: 2,  # the overfitting guard is monitoring, not counted
    "nfgsm": lambda m, run: 2,
    "gradalign": lambda m, run: 5,  # FGSM 1, g2 1, update 1, the double backward through g2's graph 2
    "free": lambda m, run: m.replays,
    "trades": lambda m, run: m.steps + 2 + 1 / 3,
    "mart": lambda m, run: m.steps + 2,
    "deat": lambda m, run: sum(h["method/replays"] for h in run["history"]) / EPOCHS,  # r of each epoch
    "gaat": lambda m, run: m.n_exact + 1,
    "awp": _awp,
    "rat": _awp,
    "oat": _oat,
    "oats": _oats,
    "rrm": lambda m, run: 1 + 1 / 3,  # the student's pass and the teacher's forward
}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A finished PGD-AT checkpoint of TINY's data, for methods that learn from a frozen model (RRM)."""
    run_dir = tmp_path_factory.mktemp("teacher")
    train(checked([*TINY, "method=pgd", f"method.steps={STEPS}", "trainer.epochs=1"]), run_dir)
    return run_dir / "checkpoints" / "last.pt"


def _config(name: str, settings: list[str], request):
    """The checked config of a tiny run of method `name`: arch=mnist_net unless `settings` choose one, or bn_cnn
    where the method refuses mnist_net (OAT and OATS condition BatchNorm; OATS slims it)."""
    steps = "steps" in method_defaults({"name": name}) and not any(s.startswith("method.steps=") for s in settings)
    if any("{teacher}" in s for s in settings):
        teacher = request.getfixturevalue("teacher")
        settings = [s.format(teacher=teacher) for s in settings]
    overrides = [*TINY, f"method={name}", *([f"method.steps={STEPS}"] if steps else []), *settings]
    try:
        return checked(overrides)
    except ConfigError as refused:  # the config check builds the arch and asks the method's check_model
        if any(s.startswith("arch=") for s in settings):
            raise
        try:
            return checked([*overrides, "arch=bn_cnn"])
        except ConfigError:
            raise refused from None


def _model(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


CASES = [pytest.param(name, SETTINGS.get(name, []), id=name) for name in shipped()]
CASES += [pytest.param(name, settings, id=case) for case, (name, settings) in VARIANTS.items()]


@pytest.mark.parametrize("name, settings", CASES)
def test_every_method_trains_costs_its_passes_and_resumes_bit_identically(name, settings, tmp_path, monkeypatch,
                                                                          request):
    if name not in PASSES:
        pytest.fail(f"method={name} has no expected cost here: add its passes per example for these settings (its row "
                    "of docs/methods.md's table) to PASSES in tests/test_every_method.py")
    cfg = _config(name, settings, request)
    train_batch, first = loop.train_batch, {}

    def watched(ctx, method, batch, cfg, sums):
        if not first:  # the weights before any update
            first.update({k: v.clone() for k, v in ctx.model.state_dict().items()})
        return train_batch(ctx, method, batch, cfg, sums)

    monkeypatch.setattr(loop, "train_batch", watched)
    straight = train(cfg, tmp_path / "straight")
    monkeypatch.undo()

    # One tiny run trains: every epoch's loss is finite and the weights moved.
    assert len(straight["history"]) == EPOCHS
    assert all(math.isfinite(h["train/loss"]) for h in straight["history"]), straight["history"]
    after = _model(tmp_path / "straight")
    assert any(not torch.equal(first[k], after[k]) for k in after if after[k].is_floating_point())

    # Its cost: the table's passes per example for these settings.
    assert straight["passes_per_example"] == pytest.approx(PASSES[name](cfg.method, straight)), cfg.method

    # Stopped by a signal after STOP_AT's batch and rerun: the same weights, losses and cost as the run left alone.
    def signalled(ctx, method, batch, cfg, sums):
        lr = train_batch(ctx, method, batch, cfg, sums)
        if (ctx.epoch, ctx.batch_idx) == STOP_AT:
            signal.raise_signal(signal.SIGUSR1)
        return lr

    monkeypatch.setattr(loop, "train_batch", signalled)
    with pytest.raises(Interrupted):
        train(cfg, tmp_path / "resumed")
    monkeypatch.undo()
    stopped = torch.load(tmp_path / "resumed" / "checkpoints" / "last.pt", weights_only=True)["loop"]
    assert (stopped["epoch"], stopped["batch"]) == (STOP_AT[0], STOP_AT[1] + 1)
    resumed = train(cfg, tmp_path / "resumed")
    a, b = after, _model(tmp_path / "resumed")
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []
    assert [h["train/loss"] for h in resumed["history"]] == [h["train/loss"] for h in straight["history"]]
    assert resumed["passes_per_example"] == straight["passes_per_example"]
