"""Every config option composes and passes the checks; bad values fail with one line naming key and valid range."""
from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

import advtrain
from advtrain.config import ConfigError, check_config, parse_pixel
from advtrain.schema import TRAIN_SECTIONS
from advtrain.engine.optim import lr_factor
from conftest import checked, compose_train

CONF = Path(advtrain.__file__).parent / "conf"
GROUPS = ["dataset", "arch", "method", "attack", "optim", "schedule", "logger"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes_and_checks(group, option):
    override = f"{group}=[{option}]" if group == "attack" else f"{group}={option}"
    cfg = checked([override])
    if group == "attack":
        assert list(cfg.attack) == [option]
    else:
        assert cfg[group].name == option or group == "arch" and cfg.arch.name == option


@pytest.mark.parametrize("preset", options("experiment"))
def test_every_experiment_preset_composes_and_checks(preset):
    cfg = checked([f"experiment={preset}"])
    dataset = max((d for d in options("dataset") if preset.startswith(d + "_")), key=len)  # fashion_mnist_...
    assert cfg.dataset.name == dataset
    assert 0 < cfg.dataset.eps <= 1 and cfg.trainer.epochs >= 1


def test_wong_mnist_preset_matches_the_paper():
    cfg = checked(["experiment=mnist_fgsm_rs_wong2020"])
    assert (cfg.arch.name, cfg.method.name, cfg.optim.name, cfg.schedule.name) == ("mnist_net", "fgsm_rs", "adam",
                                                                                   "cyclic")
    assert cfg.method.alpha_factor * cfg.method.eps == pytest.approx(0.375)
    assert (cfg.trainer.epochs, cfg.trainer.batch_size, cfg.optim.lr) == (10, 100, 5e-3)
    assert cfg.attack.pgd50.steps == 50 and cfg.attack.pgd50.restarts == 10


def test_pixel_values_accept_fractions_and_follow_the_dataset():
    cfg = checked(["dataset=cifar10", "method=pgd"])
    assert cfg.dataset.eps == pytest.approx(8 / 255)
    assert cfg.method.eps == pytest.approx(8 / 255) and cfg.method.alpha == pytest.approx(2 / 255)
    assert cfg.attack.pgd20.eps == pytest.approx(8 / 255)
    cfg = checked(["dataset=mnist", "method=trades", "dataset.eps=0.2"])
    assert cfg.method.eps == pytest.approx(0.2) and cfg.method.steps == 40
    assert parse_pixel("16/255", "x") == pytest.approx(16 / 255)


@pytest.mark.parametrize("overrides,fragment", [
    (["dataset.eps=1.5"], "dataset.eps=1.5 is outside the valid range [0, 1]"),
    (["dataset.eps=-8/255"], "outside the valid range [0, 1]"),
    (["method.alpha=300/255"], "method.alpha='300/255' is outside the valid range [0, 1]"),
    (["dataset.eps=abc"], "dataset.eps='abc': expected a number in [0, 1]"),
    (["trainer.epochs=ten"], "trainer.epochs"),
    (["trainer.epochs=0"], "trainer.epochs=0 must be > 0"),
    (["trainer.precision=fp8"], "trainer.precision='fp8' is not valid; choose one of: auto, fp32, bf16, fp16"),
    (["+trainer.epoch=3"], "unknown config key 'trainer.epoch' (did you mean trainer.epochs?)"),
    (["+method.stepz=3"], "unknown config key 'method.stepz' (did you mean method.steps?)"),
    (["+foo=1"], "unknown config key 'foo'"),
    (["trainer.devices=0"], "trainer.devices=0 must be > 0"),
    (["method=trades", "method.forward=both"], "method.forward='both' is not valid"),
    (["dataset.mean=[a]"], "dataset.mean"),
    (["method.bn=frozen"], "method.bn='frozen' is not valid; choose one of: eval, train, keep"),
    (["attack=[pgd20]", "attack.pgd20.norm=l3"], "attack.pgd20.norm='l3' is not valid; choose one of: linf, l2"),
])
def test_bad_values_fail_with_one_line_naming_the_key(overrides, fragment):
    with pytest.raises(ConfigError) as err:
        checked(overrides)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name,points", [
    ("piecewise", {0.0: 1.0, 0.49: 1.0, 0.5: 0.1, 0.8: 0.01}),
    ("cosine", {0.0: 1.0, 0.5: 0.5, 1.0: 0.0}),
    ("cyclic", {0.0: 0.0, 0.2: 0.5, 0.4: 1.0, 0.7: 0.5, 1.0: 0.0}),
    ("constant", {0.0: 1.0, 0.9: 1.0}),
])
def test_lr_schedules_follow_training_progress(name, points):
    cfg = checked([f"schedule={name}"]).schedule
    for progress, factor in points.items():
        assert lr_factor(cfg, progress) == pytest.approx(factor, abs=1e-9), progress


def test_warmup_ramps_from_zero():
    cfg = OmegaConf.create({"name": "cosine", "warmup": 0.1, "final_factor": 0.0})
    assert lr_factor(cfg, 0.05) == pytest.approx(0.5)
    assert lr_factor(cfg, 0.1) == pytest.approx(1.0)


@pytest.mark.parametrize("preset, peak", [("cifar10_fgsm_rs_wong2020", 0.5), ("mnist_fgsm_rs_wong2020", 0.4)])
def test_wong2020_presets_peak_the_lr_where_the_papers_code_does(preset, peak):
    """CIFAR10/train_fgsm.py: CyclicLR with step_size_up = lr_steps / 2; MNIST/train_mnist.py: np.interp over
    [0, epochs * 2 // 5, epochs]."""
    cfg = check_config(compose_train([f"experiment={preset}"]), TRAIN_SECTIONS)
    assert cfg.schedule.name == "cyclic" and cfg.schedule.peak_at == peak
    assert lr_factor(cfg.schedule, peak) == 1.0 and lr_factor(cfg.schedule, peak - 0.1) < 1.0


def test_a_shipped_methods_section_carries_no_target_key():
    """Only a method outside advtrain names its class; the others' sections are as they were before `_target_`
    existed, so checkpoints written then still resume (their method section is compared key by key)."""
    for method in ("pgd", "free", "natural"):
        cfg = check_config(compose_train([f"method={method}"]), TRAIN_SECTIONS)
        assert "_target_" not in cfg.method and cfg.method.name == method


def test_method_settings_reach_the_chosen_method_only():
    """A sweep over methods gives each its own settings: the chosen method's entry is merged, the others' are
    neither merged nor resolved (RRM's teacher path may name a sweep folder that only a multirun job knows)."""
    cfg = checked(["dataset=synthetic", "method=pgd", "+method_settings.pgd.steps=3",
                   "+method_settings.rrm.teacher=${oc.env:NOT_SET_ANYWHERE}"])
    assert cfg.method.steps == 3 and "method_settings" not in cfg
    assert checked(["dataset=synthetic", "method=trades", "+method_settings.pgd.steps=3"]).method.steps == 7  # the synthetic default


def test_method_settings_name_real_methods_and_keys_in_one_line():
    with pytest.raises(ConfigError, match=r"^method_settings.trade: there is no method 'trade' \(did you mean "
                                          r"trades\?\); methods: awp, "):
        checked(["method=pgd", "+method_settings.trade.beta=1.0"])
    with pytest.raises(ConfigError, match=r"unknown config key 'method.stepz' \(did you mean method.steps\?\)"):
        checked(["method=pgd", "+method_settings.pgd.stepz=3"])


@pytest.mark.parametrize("preset, drops", [("cifar10_trades_wrn34", [74]), ("cifar10_mart_wrn34", [74, 89])])
def test_a_presets_lr_drops_in_the_epochs_the_authors_code_drops_it(preset, drops):
    """TRADES' and MART's adjust_learning_rate lowers the LR from their (1-based) epoch 75 (and 90): after 74 (and
    89) epochs. Each epoch's LR is read at its first and last of 391 steps (CIFAR-10 at batch 128)."""
    cfg = checked([f"experiment={preset}"])
    epochs, steps = cfg.trainer.epochs, 391
    first = [lr_factor(cfg.schedule, e * steps / (epochs * steps)) for e in range(epochs)]
    last = [lr_factor(cfg.schedule, (e * steps + steps - 1) / (epochs * steps)) for e in range(epochs)]
    assert first == last  # constant within each epoch
    assert [e for e in range(1, epochs) if first[e] < first[e - 1]] == drops
