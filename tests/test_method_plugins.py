"""A method is one module and one YAML: the shipped ones mirror each other, and a new one outside the package trains
with nothing else edited."""
from __future__ import annotations

import json
import textwrap
from dataclasses import MISSING, fields

import pytest
from omegaconf import OmegaConf

from advtrain.methods import discover, method_class, shipped
from conftest import REPO, TINY, run_cli

CONF = REPO / "advtrain" / "conf" / "method"


def test_every_shipped_yaml_has_its_module_and_no_module_lacks_its_yaml():
    assert shipped() == sorted(discover())


@pytest.mark.parametrize("name", shipped())
def test_a_method_yaml_sets_exactly_its_configs_fields_with_its_defaults(name):
    yaml = OmegaConf.load(CONF / f"{name}.yaml")
    config = {f.name: f for f in fields(method_class({"name": name}).Config) if f.name != "_target_"}
    assert yaml.name == name
    assert set(yaml) == set(config), "the YAML and the Config dataclass list different settings"
    for key, f in config.items():
        if key == "name" or OmegaConf.is_interpolation(yaml, key):
            continue  # name: the YAML's own; interpolations: the dataset's threat model
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        assert yaml[key] == default, f"{name}.{key}: YAML {yaml[key]!r}, Config {default!r}"


PLUGIN = '''
"""Natural training on the inputs scaled by `gain`: a method written outside advtrain."""
from dataclasses import dataclass

from advtrain.methods import Method
from advtrain.methods.base import cross_entropy_update
from advtrain.schema import MethodConfig, choice


class Scaled(Method):
    @dataclass
    class Config(MethodConfig):
        gain: float = 1.0
        mode: str = choice("plain", "squared")

    def train_step(self, batch, ctx):
        gain = self.cfg.gain ** (2 if self.cfg.mode == "squared" else 1)
        return cross_entropy_update(ctx, batch.x * gain, batch.y)
'''

PLUGIN_YAML = '''
# My method, kept outside advtrain.
_target_: my_methods.scaled.Scaled
name: scaled
gain: 0.9
mode: plain
'''


@pytest.mark.slow
def test_a_new_method_outside_the_package_trains_with_nothing_else_edited(tmp_path):
    """What docs/methods.md's "Adding a method" says, step by step."""
    (tmp_path / "my_methods").mkdir()
    (tmp_path / "my_methods" / "__init__.py").write_text("")
    (tmp_path / "my_methods" / "scaled.py").write_text(textwrap.dedent(PLUGIN))
    (tmp_path / "my_conf" / "method").mkdir(parents=True)
    (tmp_path / "my_conf" / "method" / "scaled.yaml").write_text(textwrap.dedent(PLUGIN_YAML))
    run_dir = tmp_path / "run"
    args = [*TINY, "method=scaled", f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]", f"hydra.run.dir={run_dir}"]
    env = {"PYTHONPATH": str(tmp_path)}
    proc = run_cli([*args, "method.mode=cubed"], cwd=tmp_path, env=env)  # its choices are checked like ours
    assert proc.returncode == 2 and "method.mode='cubed' is not valid; choose one of: plain, squared" in proc.stderr
    proc = run_cli(args, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((run_dir / "results.json").read_text())
    assert results["method"] == "scaled" and results["config"]["method"]["gain"] == 0.9
    assert 0 <= results["eval"]["pgd20"] <= results["eval"]["clean"] <= 1
