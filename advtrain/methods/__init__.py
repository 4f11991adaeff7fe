"""Training methods as plug-ins over one loop. A method is one module, and its YAML is written from it:

- `advtrain/methods/<name>.py` defines one subclass of `Method`, with its settings and their defaults in a nested
  `Config(MethodConfig)` dataclass (`pixel()` and `choice()` mark pixel-unit and fixed-choice fields);
- `advtrain/conf/method/<name>.yaml`, which `method=<name>` selects, is written from that Config by
  `python scripts/method_yaml.py <name>` (tests check that it still matches).

A method kept outside the package (your own code) names its class in the YAML instead: `_target_:
my_package.my_method.MyMethod`, with the YAML in a config folder Hydra searches (`hydra.searchpath=[file://...]`).
docs/methods.md, "Adding a method", walks through one.
"""
from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from types import ModuleType
from typing import Any, Mapping

from advtrain.errors import ConfigError
from advtrain.methods.base import Method, config_of

# modules of this package that hold no method
HELPERS = {"base", "context", "overfitting_guard", "replay", "schedules", "steps_schedule", "threat"}


class UnknownMethod(ConfigError):
    pass


def shipped() -> list[str]:
    """The methods advtrain ships: one YAML each in advtrain/conf/method/."""
    folder = Path(__file__).resolve().parents[1] / "conf" / "method"
    return sorted(p.stem for p in folder.glob("*.yaml"))


def the_method_of(module: ModuleType) -> type[Method]:
    """The one Method subclass a method module defines."""
    found = [c for c in vars(module).values()
             if isinstance(c, type) and issubclass(c, Method) and c.__module__ == module.__name__]
    if len(found) != 1:
        raise UnknownMethod(f"{module.__name__} must define exactly one subclass of advtrain.methods.Method; it "
                            f"defines {len(found)}")
    return found[0]


def method_class(section: Mapping[str, Any]) -> type[Method]:
    """The class a method section selects: its `_target_`, else advtrain/methods/<name>.py."""
    target = section.get("_target_")
    if target:
        module_name, _, class_name = str(target).rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError, ValueError) as e:
            raise UnknownMethod(f"method._target_={target!r} cannot be imported ({e}); give the class as "
                                "package.module.Class, importable from this Python") from None
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise UnknownMethod(f"method._target_={target!r} is not a subclass of advtrain.methods.Method")
        return cls
    name = section.get("name")
    if not isinstance(name, str) or name in HELPERS or not (Path(__file__).parent / f"{name}.py").is_file():
        raise UnknownMethod(f"method={name!r} is not a known method; choose one of: {', '.join(shipped())}")
    return the_method_of(importlib.import_module(f"{__name__}.{name}"))


def discover() -> dict[str, type[Method]]:
    """Every method module of this package, by name."""
    return {info.name: the_method_of(importlib.import_module(f"{__name__}.{info.name}"))
            for info in pkgutil.iter_modules(__path__) if info.name not in HELPERS}


def method_defaults(section: Mapping[str, Any]) -> dict[str, Any]:
    """Every setting of the method `section` selects, at its Config default: what a checkpoint written before a
    setting existed ran with (a knob added later defaults to the behaviour before it). {} for an unknown method."""
    try:
        return vars(config_of(method_class(section)))
    except ConfigError:
        return {}


def build_method(cfg, info) -> Method:
    return method_class(cfg)(cfg, info)


def __getattr__(name: str):
    if name == "METHODS":  # name -> class of every method this package holds
        return discover()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Method", "build_method", "discover", "method_class", "method_defaults", "shipped", "the_method_of"]
