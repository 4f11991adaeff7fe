"""Config checking: every composed config is checked here before any work starts.

Hydra composes YAML; this module checks it against the sections' schemas (advtrain.schema, and each method's own
from its plug-in) and turns every violation into one line that names the key and what is valid:
an unknown key, a value of the wrong type, an eps or step size outside [0, 1]. Pixel quantities accept the form
"8/255" and leave this module as floats, so the rest of the code reads plain numbers.
"""
from __future__ import annotations

import difflib
import importlib.util
import math
from dataclasses import fields
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, InterpolationResolutionError, OmegaConfBaseException

from advtrain.errors import ConfigError
from advtrain.schema import AttackConfig




def parse_pixel(value: Any, key: str) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{key}={value!r}: expected a number in [0, 1] pixel units, e.g. 0.3 or 8/255")
    if isinstance(value, str):
        num, sep, den = value.partition("/")
        try:
            number = float(num) / float(den) if sep else float(value)
        except (ValueError, ZeroDivisionError):
            raise ConfigError(f"{key}={value!r}: expected a number in [0, 1] pixel units, e.g. 0.3 or 8/255") from None
    elif isinstance(value, (int, float)):
        number = float(value)
    else:
        raise ConfigError(f"{key}={value!r}: expected a number in [0, 1] pixel units, e.g. 0.3 or 8/255")
    if not (0.0 <= number <= 1.0) or math.isnan(number):
        raise ConfigError(f"{key}={value!r} is outside the valid range [0, 1] (pixel units; e.g. 0.3 or 8/255)")
    return number


POSITIVE = ("trainer.epochs", "trainer.batch_size", "trainer.devices", "eval.batch_size", "eval.every_n",
            "trainer.nan_check_every", "optim.lr", "logger.init_timeout_s")
NON_NEGATIVE = ("trainer.checkpoint_every", "eval.every", "dataset.val_size", "dataset.crop_padding",
                "optim.weight_decay", "dataset.pgd_steps", "trainer.eps_warmup")


# --- checking ---------------------------------------------------------------------------------------------------
def _schema_keys(schema) -> list[str]:
    return [f.name for f in fields(schema)]


def _check_section(section: Any, schema, prefix: str) -> dict:
    if not isinstance(section, dict):
        raise ConfigError(f"{prefix}={section!r}: expected a config group (a mapping), not a single value")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), section)
        OmegaConf.to_container(merged, throw_on_missing=True)
    except ConfigKeyError as e:
        key = str(e.key) if e.key is not None else str(e.full_key)
        raise ConfigError(_unknown_key(f"{prefix}.{key}", key, _schema_keys(schema))) from None
    except OmegaConfBaseException as e:
        msg = getattr(e, "msg", str(e)).splitlines()[0]
        if "Missing mandatory value" in msg:
            raise ConfigError(f"{prefix}.{e.full_key} is required but not set") from None
        raise ConfigError(f"{prefix}.{e.full_key}: {msg}") from None
    out = OmegaConf.to_container(merged)
    for f in fields(schema):
        if f.metadata.get("pixel") and out[f.name] is not None:
            out[f.name] = parse_pixel(out[f.name], f"{prefix}.{f.name}")
        valid = f.metadata.get("choices")
        if valid and str(out[f.name]).lower() not in valid:
            raise ConfigError(f"{prefix}.{f.name}={out[f.name]!r} is not valid; choose one of: {', '.join(valid)}")
    return out


def _unknown_key(full_key: str, key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown config key '{full_key}'{hint}; valid keys there: {', '.join(sorted(valid))}"


def _get(cfg: dict, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


TOP_LEVEL = {"dataset", "arch", "method", "attack", "optim", "schedule", "trainer", "eval", "logger",
             "seed", "resume", "experiment", "checkpoint"}


def check_config(cfg: DictConfig, sections: dict[str, type]) -> DictConfig:
    """Check and normalise a composed config: returns a resolved copy with pixel values as floats.

    `sections` maps each top-level section to its schema; `method` and `attack` are checked against the plug-ins'
    own schemas. Raises ConfigError (one line) on the first problem.
    """
    try:
        raw = OmegaConf.to_container(cfg, resolve=True)
    except InterpolationResolutionError as e:
        raise ConfigError(f"config value {e.full_key} could not be resolved: {str(e).splitlines()[0]}") from None
    unknown = sorted(set(raw) - TOP_LEVEL)
    if unknown:
        raise ConfigError(_unknown_key(unknown[0], unknown[0], sorted(TOP_LEVEL)))
    out = dict(raw)
    for name, schema in sections.items():
        out[name] = _check_section(raw.get(name) or {}, schema, name)
    if "method" in raw:
        out["method"] = _check_method(raw["method"])
    if "attack" in raw:
        out["attack"] = _check_attacks(raw["attack"])
    for key in POSITIVE:
        if key.split(".")[0] in out and not _get(out, key) > 0:
            raise ConfigError(f"{key}={_get(out, key)!r} must be > 0")
    for key in NON_NEGATIVE:
        if key.split(".")[0] in out and _get(out, key) < 0:
            raise ConfigError(f"{key}={_get(out, key)!r} must be >= 0")
    if "trainer" in out and out["trainer"].get("eps_warmup", 0) > 1:
        raise ConfigError(f"trainer.eps_warmup={out['trainer']['eps_warmup']!r} is a fraction of training: "
                          "choose a value in [0, 1]")
    n = (out.get("eval") or {}).get("n")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ConfigError(f"eval.n={n!r} must be a positive number of test examples, or null for the whole test set")
    if "seed" in out and not isinstance(out["seed"], int):
        raise ConfigError(f"seed={out['seed']!r}: expected an integer")
    _check_optional_packages(out)
    return OmegaConf.create(out)


def _check_optional_packages(cfg: dict) -> None:
    """AutoAttack and W&B are imported only when a run uses them; a run that would need a missing one fails here,
    before any training, not at its final evaluation hours later."""
    def missing(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is None
        except ImportError:  # a finder that refuses it (as a broken install, or a test hiding it, does)
            return True

    auto = [name for name, spec in (cfg.get("attack") or {}).items() if spec.get("type") == "autoattack"]
    if auto and missing("pyautoattack"):
        raise ConfigError(f"attack {auto[0]!r} needs the pyautoattack package (the official AutoAttack), which is "
                          "not installed: pip install pyautoattack, or leave it out of attack=[...]")
    logger = cfg.get("logger") or {}
    if logger.get("name") == "wandb" and logger.get("mode") != "disabled" and missing("wandb"):
        raise ConfigError("logger=wandb needs the wandb package, which is not installed: pip install wandb, "
                          "or run with logger=none")


def _check_method(section: Any) -> dict:
    from advtrain.methods import UnknownMethod, method_class

    try:
        cls = method_class(section if isinstance(section, dict) else {"name": section})
    except UnknownMethod as e:
        raise ConfigError(str(e)) from None
    out = _check_section(section, cls.Config, "method")
    if out.get("_target_") is None:  # only a method outside advtrain names its class: the others' sections (and
        out.pop("_target_", None)    # the checkpoints a run resumes from) stay as they were
    return out


def _check_attacks(section: Any) -> dict:
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise ConfigError(f"attack={section!r}: expected attack suite entries such as attack=[pgd20,autoattack]")
    # Keep only the keys each entry sets: the attack engine checks them against what its type takes.
    suite = {name: {k: v for k, v in _check_section(spec, AttackConfig, f"attack.{name}").items() if k in spec}
             for name, spec in section.items()}
    for name, spec in suite.items():
        if spec["type"] in ("pgd", "cw") and (spec.get("steps", 0) < 1 or spec.get("alpha") is None):
            raise ConfigError(f"attack.{name}: a {spec['type']} attack needs steps >= 1 and an alpha (step size)")
        if spec.get("restarts", 1) < 1:
            raise ConfigError(f"attack.{name}.restarts={spec['restarts']} must be >= 1")
    return suite

