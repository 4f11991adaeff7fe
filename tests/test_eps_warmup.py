"""trainer.eps_warmup: the threat model ramps up linearly over the first part of training, for every method alike."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from advtrain.config import ConfigError
from advtrain.engine.loop import eps_factor
from advtrain.engine.run import train
from advtrain.methods import build_method
from conftest import checked as conftest_checked

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: 1 thread, restored afterwards

SYNTH = ["dataset=synthetic", "arch=mnist_net", "logger=none", "trainer.progress=off", "dataset.n_train=256",
         "dataset.n_test=64", "trainer.batch_size=64", "attack=[]"]


def checked(overrides):
    return conftest_checked(SYNTH + overrides)


def test_factor_ramps_linearly_then_holds():
    assert [eps_factor(0.5, p) for p in (0.0, 0.125, 0.25, 0.5, 0.9)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    assert eps_factor(0.0, 0.0) == 1.0


@pytest.mark.parametrize("method", ["pgd", "deat", "free", "gaat"])
def test_budget_scales_the_pixel_settings_only_and_restores_them_exactly(method):
    cfg = checked([f"method={method}"])
    m = build_method(cfg.method, SimpleNamespace(name="synthetic"))
    full = {k: getattr(cfg.method, k) for k in ("eps", "alpha", "step", "tau", "steps", "replays") if k in cfg.method}
    m.threat.scale = 0.25
    for key, value in full.items():
        if key in ("steps", "replays"):
            assert not hasattr(m.threat, key) and getattr(m.cfg, key) == value  # counts are not in pixel units
        elif value is None:
            assert getattr(m.threat, key) is None
        else:
            assert getattr(m.threat, key) == pytest.approx(0.25 * value)
    assert m.cfg is cfg.method  # the configured values stay where they were
    m.threat.scale = 1.0
    assert all(getattr(m.threat, k) == v for k, v in full.items() if k not in ("steps", "replays"))


@pytest.mark.parametrize("overrides", [["method=awp"], ["method=awp", "method.base=trades"], ["method=rat"]])
def test_a_method_built_inside_another_attacks_at_the_outer_scale(overrides):
    """AWP's base and RAT's TRADES hold the outer method's threat model: the one scale the loop sets reaches them."""
    cfg = checked(overrides)
    m = build_method(cfg.method, SimpleNamespace(name="synthetic", num_classes=10))
    inner = m.trades if cfg.method.name == "rat" else m.base
    m.threat.scale = 0.25
    assert inner.threat is m.threat and inner.threat.eps == pytest.approx(0.25 * cfg.method.eps)
    assert inner.threat.alpha == pytest.approx(0.25 * cfg.method.alpha)


def test_attacks_during_warmup_use_the_ramped_eps(tmp_path, monkeypatch):
    """PGD-AT's attack radius per batch follows the ramp: 2 epochs, warm-up over the first half."""
    import advtrain.methods.steps_schedule as steps_schedule

    seen = []
    plain = steps_schedule.pgd

    def recording(model, x, y, **kw):
        seen.append(kw["eps"])
        return plain(model, x, y, **kw)

    monkeypatch.setattr(steps_schedule, "pgd", recording)
    train(checked(["method=pgd", "trainer.epochs=2", "trainer.eps_warmup=0.5"]), tmp_path)
    eps = 0.1  # synthetic data's threat model
    # 4 batches per epoch; batch b of epoch 0 is at progress b/8 of training, so at (b/8) / 0.5 of the ramp.
    assert seen == pytest.approx([0.0, 0.25 * eps, 0.5 * eps, 0.75 * eps] + [eps] * 4)
    assert seen[4:] == [eps] * 4  # exactly the configured value once the ramp is over


def test_warmup_outside_0_1_is_a_one_line_error():
    with pytest.raises(ConfigError, match=r"trainer.eps_warmup=1.5 is a fraction of training"):
        checked(["trainer.eps_warmup=1.5"])


def test_fgsm_rs_guard_attacks_at_the_full_eps_during_the_warmup(tmp_path, monkeypatch):
    """The overfitting guard compares epochs at one threat model: the full eps, whatever the warm-up's scale."""
    import advtrain.methods.fgsm_rs as fgsm_rs
    import advtrain.methods.overfitting_guard as guard

    guard_eps = []
    plain = fgsm_rs.pgd

    def recording(model, x, y, **kw):
        if kw.get("steps", 1) > 1:  # the guard's PGD (the training attack is one FGSM step)
            guard_eps.append(kw["eps"])
        return plain(model, x, y, **kw)

    monkeypatch.setattr(fgsm_rs, "pgd", recording)
    monkeypatch.setattr(guard, "pgd", recording)  # the guard's own PGD (advtrain.methods.overfitting_guard)
    train(checked(["method=fgsm_rs", "trainer.epochs=3", "trainer.eps_warmup=0.9"]), tmp_path)
    assert guard_eps == [0.1, 0.1, 0.1]  # synthetic data's eps; the warm-up was at 0.4 and 0.7 of it
