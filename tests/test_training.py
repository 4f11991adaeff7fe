"""Each method trains (in-process, synthetic data): the loss falls, its cost is accounted, robust beats natural."""
from __future__ import annotations

import pytest

from advtrain.config import check_config
from advtrain.schema import TRAIN_SECTIONS
from advtrain.engine.run import train
from conftest import compose_train

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: 1 thread, restored afterwards

# Natural training relies on the synthetic data's faint non-robust pattern; adversarial training cannot.
SYNTH = ["dataset=synthetic", "arch=mnist_net", "logger=none", "trainer.progress=off", "dataset.n_train=2048",
         "dataset.n_test=256", "trainer.batch_size=64", "optim=adam", "optim.lr=2e-3", "schedule=constant",
         "attack=[pgd20]"]


def run(tmp_path, overrides):
    cfg = check_config(compose_train(SYNTH + overrides), TRAIN_SECTIONS)
    return train(cfg, tmp_path)


@pytest.fixture(scope="module")
def natural(tmp_path_factory):
    return run(tmp_path_factory.mktemp("natural"), ["method=natural", "trainer.epochs=4"])


@pytest.mark.parametrize("method,epochs,passes", [
    ("pgd", 4, 8.0),                 # K = 7 attack steps + 1 update
    ("fgsm_rs", 4, 2.0),
    ("trades", 4, 7 + 1 / 3 + 2),    # K attack steps + the clean forward for p(x) + the two halves of the update
    ("free", 2, 2.0),                # m = 2 replays per minibatch: 2 passes per example per epoch
])
def test_method_trains_and_beats_natural_under_attack(tmp_path, natural, method, epochs, passes):
    extra = ["method.replays=2"] if method == "free" else []
    results = run(tmp_path, [f"method={method}", f"trainer.epochs={epochs}", *extra])
    history = results["history"]
    assert results["passes_per_example"] == pytest.approx(passes)
    if len(history) > 1:
        assert history[-1]["train/loss"] < history[0]["train/loss"]
    robust, robust_natural = results["eval"]["pgd20"], natural["eval"]["pgd20"]
    assert robust > robust_natural + 0.3, (method, results["eval"], natural["eval"])


def test_natural_is_accurate_but_not_robust(natural):
    assert natural["passes_per_example"] == pytest.approx(1.0)
    assert natural["history"][-1]["train/loss"] < natural["history"][0]["train/loss"]
    assert natural["eval"]["clean"] > 0.9
    assert natural["eval"]["pgd20"] < 0.3
