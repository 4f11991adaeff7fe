"""A method is one module whose YAML is written from its Config (the shipped ones match it), and a new one outside
the package trains with nothing else edited."""
from __future__ import annotations

import json
import sys
import textwrap
from dataclasses import fields

import pytest
from omegaconf import OmegaConf

from advtrain.methods import discover, method_class, shipped
from conftest import REPO, TINY, run_cli

sys.path.insert(0, str(REPO / "scripts"))
from method_yaml import _comments_in, method_yaml  # noqa: E402

CONF = REPO / "advtrain" / "conf" / "method"


def test_every_shipped_yaml_has_its_module_and_no_module_lacks_its_yaml():
    assert shipped() == sorted(discover())


@pytest.mark.parametrize("name", shipped())
def test_a_method_yaml_is_its_config_written_out(name):
    """The Config dataclass is the one place a method's defaults live; its YAML (what Hydra composes, without
    importing torch) is written from it by scripts/method_yaml.py, field by field with its comment."""
    assert (CONF / f"{name}.yaml").read_text() == method_yaml(name), \
        f"advtrain/conf/method/{name}.yaml differs from its Config: run python scripts/method_yaml.py {name}"
    yaml = OmegaConf.load(CONF / f"{name}.yaml")
    config = {f.name for f in fields(method_class({"name": name}).Config)} - {"_target_"}
    assert yaml.name == name and set(yaml) == config


def test_the_yaml_writer_reads_every_kind_of_comment_a_config_has():
    """Comments above a field, inline, and an inline comment wrapped under itself, each to its own field."""
    source = textwrap.dedent('''
        class Config(MethodConfig):
            # above a, line 1
            # above a, line 2
            a: int = 1       # inline a
            b: str = "x#y"   # inline b, after a '#' inside a string,
                             # wrapped under itself
            # above c
            c: float = 0.5
            d: int = 0
    ''')
    assert _comments_in(source) == {"a": "above a, line 1 above a, line 2 inline a",
                                    "b": "inline b, after a '#' inside a string, wrapped under itself",
                                    "c": "above c", "d": ""}


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
