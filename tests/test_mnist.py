"""Real MNIST (skipped without ../shared/data): FGSM-RS is far more robust than natural training."""
from __future__ import annotations

import pytest

from advtrain.config import check_config
from advtrain.schema import TRAIN_SECTIONS
from advtrain.engine.run import train
from conftest import compose_train

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def run(tmp_path, root, method):
    cfg = check_config(compose_train([
        "experiment=mnist_fgsm_rs_wong2020", f"method={method}", f"dataset.root={root}", "logger=none",
        "dataset.train_subset=10000", "trainer.epochs=4", "eval.n=500", "attack=[pgd20]",
        "trainer.progress=off"]), TRAIN_SECTIONS)
    return train(cfg, tmp_path)


def test_fgsm_rs_is_far_more_robust_than_natural_training(tmp_path, mnist_root):
    natural = run(tmp_path / "natural", mnist_root, "natural")
    fgsm_rs = run(tmp_path / "fgsm_rs", mnist_root, "fgsm_rs")
    # Adversarial training pays in clean accuracy, more so in 4 short epochs at eps 0.3: 89.4 % measured with torch
    # 2.14 (above 90 % with earlier releases), against 98.2 % for natural training.
    assert natural["eval"]["clean"] > 0.9 and fgsm_rs["eval"]["clean"] > 0.85
    assert natural["eval"]["pgd20"] < 0.1
    assert fgsm_rs["eval"]["pgd20"] > natural["eval"]["pgd20"] + 0.5, (natural["eval"], fgsm_rs["eval"])


def test_an_eps_warmup_run_is_not_cut_short_by_the_fgsm_rs_guard(tmp_path, mnist_root):
    """Reproduces the report: with the guard measuring at the warm-up's eps, the rising threat model read as a
    collapse ("guard PGD accuracy fell from 0.668 to 0.387") and training stopped after epoch 4 of 5."""
    cfg = check_config(compose_train([
        "experiment=mnist_fgsm_rs_wong2020", f"dataset.root={mnist_root}", "logger=none",
        "dataset.train_subset=6000", "trainer.epochs=5", "trainer.eps_warmup=0.8", "eval.n=200", "attack=[pgd20]",
        "trainer.progress=off"]), TRAIN_SECTIONS)
    results = train(cfg, tmp_path)
    assert results["stop_reason"] is None and results["epochs_run"] == 5
    guard = [h["method/guard_pgd_acc"] for h in results["history"]]
    assert len(guard) == 5 and guard[-1] > guard[0]  # measured at eps 0.3 throughout: it rises as training goes on
