"""A config error is answered about as fast as `advtrain --help`, naming the nearest valid key.

Listing the method settings a mistyped key could have meant once imported every method module, torch and, through
torchvision, torch._dynamo: 33-48 s on a cold disk to answer `advtrain method.step=10`."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from advtrain.errors import ConfigError
from advtrain.hydra_errors import describe_hydra_error
from conftest import REPO, checked, compose_train, run_cli

# Every unknown key is answered with the nearest valid one, dotted as it would be typed again.
TYPOS = [
    (["method.step=10"], "method.steps"),
    (["method=oat", "method.lambda=[0,1]"], "method.lambdas"),
    (["trainer.epoch=3"], "trainer.epochs"),
    (["dataset.epz=0.1"], "dataset.eps"),
    (["eval.batch_siz=8"], "eval.batch_size"),
    (["optim.l=0.1"], "optim.lr"),
    (["schedule.warmp=0.1"], "schedule.warmup"),
    (["arch.dept=18"], "arch.depth"),
    (["logger=wandb", "logger.projet=x"], "logger.project"),
    (["attack=[pgd20]", "attack.pgd20.stepz=3"], "attack.pgd20.steps"),
    (["seeed=1"], "seed"),
]


def _composition_error(overrides: list[str]) -> str:
    with pytest.raises(Exception) as err:
        compose_train(overrides)
    message = describe_hydra_error(err.value)
    assert message is not None and "\n" not in message
    return message


@pytest.mark.parametrize("overrides,nearest", TYPOS)
def test_a_mistyped_key_names_the_nearest_valid_one(overrides, nearest):
    typo = overrides[-1].partition("=")[0]
    message = _composition_error(overrides)
    assert f"'{typo}'" in message and f"(did you mean {nearest}?)" in message, message


@pytest.mark.parametrize("overrides,nearest", [t for t in TYPOS if "." in t[0][-1].partition("=")[0]])
def test_a_mistyped_added_key_names_the_nearest_valid_one_too(overrides, nearest):
    """+key=... passes composition; the config check refuses it in the same words."""
    typo = overrides[-1].partition("=")[0]
    with pytest.raises(ConfigError) as err:
        checked([*overrides[:-1], "+" + overrides[-1]])
    assert f"'{typo}'" in str(err.value) and f"(did you mean {nearest}?)" in str(err.value), str(err.value)


def test_a_key_only_another_option_takes_says_so():
    message = _composition_error(["logger=none", "logger.projet=x"])
    assert message.startswith("unknown config key 'logger.projet' (other logger options take logger.project)")
    message = _composition_error(["method=natural", "method.steps=5"])
    assert message == "'method.steps' is not a setting of the chosen method option; it takes: name"
    message = _composition_error(["attack=[pgd20]", "attack.pgd20.loss=cw"])
    assert "add it with +attack.pgd20.loss=..." in message


PROBE = """
import json, sys
from hydra import compose, initialize_config_module
from advtrain.errors import ConfigError
from advtrain.hydra_errors import describe_hydra_error
from advtrain.config import check_config
from advtrain.schema import TRAIN_SECTIONS

try:
    with initialize_config_module(config_module="advtrain.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=sys.argv[1:])
    check_config(cfg, TRAIN_SECTIONS)
    message = None
except ConfigError as e:
    message = str(e)
except Exception as e:
    message = describe_hydra_error(e)
print(json.dumps({"message": message, "modules": sorted(m for m in sys.modules if m.startswith(
    ("advtrain.methods.", "advtrain.data", "torch", "torchvision")))}))
"""


def _probe(overrides: list[str]) -> tuple[str, set[str]]:
    """The error a fresh process gives for `overrides`, and the modules it imported to give it."""
    proc = subprocess.run([sys.executable, "-c", PROBE, *overrides], capture_output=True, text=True, cwd=REPO,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return out["message"], set(out["modules"])


def test_a_mistyped_method_key_imports_no_method_and_no_torch():
    message, modules = _probe(["method.step=10"])
    assert "(did you mean method.steps?)" in message
    assert not {m for m in modules if m.startswith(("torch", "advtrain.methods."))}, sorted(modules)


def test_the_config_check_imports_the_chosen_method_alone():
    message, modules = _probe(["+method.step=10"])
    assert "unknown config key 'method.step' (did you mean method.steps?)" in message
    assert "advtrain.methods.pgd" in modules
    assert not modules & {"advtrain.methods.oat", "advtrain.methods.gaat", "torch._dynamo", "torchvision"}


def test_a_method_that_cannot_wrap_the_arch_is_refused_before_any_data():
    message, modules = _probe(["method=oat", "arch=mnist_net"])
    assert "method=oat conditions BatchNorm layers, and arch=mnist_net has none" in message
    assert not {m for m in modules if m.startswith(("advtrain.data", "torchvision", "torch._dynamo"))}


@pytest.mark.slow
def test_a_mistyped_key_is_answered_about_as_fast_as_help(tmp_path):
    """Side by side, so the machine's load weighs on both alike. Before, the typo took 5.7x --help here (3.4 s
    against 0.6 s, and 33-48 s on a cold disk); importing torch alone takes longer than the bound."""
    runs = {"help": ["--help"], "typo": ["method.step=10", "logger=none"]}
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(3):
        for name, args in runs.items():
            start = time.perf_counter()
            proc = run_cli(args, cwd=tmp_path, timeout=120)
            seconds[name].append(time.perf_counter() - start)
            assert proc.returncode == (0 if name == "help" else 2), proc.stderr
    help_s, typo_s = min(seconds["help"]), min(seconds["typo"])
    assert typo_s < 2 * help_s + 0.5, f"typo {typo_s:.2f} s, --help {help_s:.2f} s"
    assert "(did you mean method.steps?)" in proc.stderr and proc.stderr.count("\n") == 1
