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
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, InterpolationResolutionError, OmegaConfBaseException

from advtrain.errors import ConfigError
from advtrain.schema import SEED_MAX, AttackConfig




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
# trainer.log_every_s=0 is meaningful: a progress line at every step.
NON_NEGATIVE = ("trainer.checkpoint_every", "trainer.keep_checkpoints", "eval.every", "dataset.val_size",
                "dataset.crop_padding",
                "optim.weight_decay", "dataset.pgd_steps", "trainer.log_every_s")


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
        _check_finite(out[f.name], f"{prefix}.{f.name}", f)
        if "range" in f.metadata:
            _check_range(out[f.name], f"{prefix}.{f.name}", *f.metadata["range"], f.metadata["what"])
    return out


def _check_finite(value: Any, key: str, f) -> None:
    """NaN and infinity pass every comparison check (nan < 0 is false) and then fail deep inside torch, or silently
    train on nonsense: no setting takes them."""
    values = value if isinstance(value, list) else [value]
    if any(isinstance(v, float) and not math.isfinite(v) for v in values):
        default = f.default_factory() if callable(f.default_factory) else f.default
        example = f" (the default is {default})" if default is not None and default != "???" else ""
        raise ConfigError(f"{key}={value!r}: expected a finite number{example}")


def _bound(x: float) -> str:
    return "2**64 - 1" if x == SEED_MAX else f"{x:g}" if isinstance(x, float) else str(x)


def _check_range(value: Any, key: str, low: float, high: float | None, what: str) -> None:
    values = value if isinstance(value, list) else [value]
    if all(v is None or (low <= v and (high is None or v <= high)) for v in values):
        return
    bounds = f">= {_bound(low)}" if high is None else f"in [{_bound(low)}, {_bound(high)}]"
    if isinstance(value, list):
        raise ConfigError(f"{key}={value!r}: each value is {what}: choose values {bounds}")
    raise ConfigError(f"{key}={value!r} is {what}: choose a value {bounds}")


def _unknown_key(full_key: str, key: str, valid: list[str], *, hint: str = "") -> str:
    """The one line for a key no schema takes, naming the nearest valid one in full, as it would be typed again."""
    return f"unknown config key '{full_key}'{hint or did_you_mean(full_key, key, valid)}{_listing(valid)}"


def nearest(full_key: str, key: str, valid: list[str]) -> str | None:
    """The valid key closest to the mistyped `key`, dotted like `full_key` (method.step -> method.steps)."""
    close = difflib.get_close_matches(key, valid, n=1)
    return full_key[:len(full_key) - len(key)] + close[0] if close else None


def did_you_mean(full_key: str, key: str, valid: list[str]) -> str:
    near = nearest(full_key, key, valid)
    return f" (did you mean {near}?)" if near else ""


def _listing(valid: list[str]) -> str:
    shown = sorted(k for k in valid if not k.startswith("_"))  # _target_ is a plug-in's class, not a setting
    return f"; valid keys there: {', '.join(shown)}" if shown else ""


def _get(cfg: dict, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


TOP_LEVEL = {"dataset", "arch", "method", "attack", "optim", "schedule", "trainer", "eval", "logger",
             "seed", "resume", "experiment", "checkpoint", "method_settings"}


def check_config(cfg: DictConfig, sections: dict[str, type], overrides: list[str] | None = None) -> DictConfig:
    """Check and normalise a composed config: returns a resolved copy with pixel values as floats.

    `sections` maps each top-level section to its schema; `method` and `attack` are checked against the plug-ins'
    own schemas. `overrides`: the command line's overrides (default: those of the running Hydra job, if any), where
    what composition merged away is still visible (an attack named twice). Raises ConfigError (one line) on the
    first problem.
    """
    try:
        cfg, own_settings = _pop_method_settings(cfg)
        raw = OmegaConf.to_container(cfg, resolve=True)
    except InterpolationResolutionError as e:
        raise ConfigError(f"config value {e.full_key} could not be resolved: {str(e).splitlines()[0]}") from None
    if own_settings:
        raw["method"] = {**raw["method"], **own_settings}
    unknown = sorted(set(raw) - TOP_LEVEL)
    if unknown:
        raise ConfigError(_unknown_key(unknown[0], unknown[0], sorted(TOP_LEVEL)))
    out = dict(raw)
    for name, schema in sections.items():
        out[name] = _check_section(raw.get(name) or {}, schema, name)
    method = None
    if "method" in raw:
        method, out["method"] = _check_method(raw["method"])
    if "attack" in raw:
        out["attack"] = _check_attacks(raw["attack"])
    for key in POSITIVE:
        if key.split(".")[0] in out and not _get(out, key) > 0:
            raise ConfigError(f"{key}={_get(out, key)!r} must be > 0")
    for key in NON_NEGATIVE:
        if key.split(".")[0] in out and _get(out, key) < 0:
            raise ConfigError(f"{key}={_get(out, key)!r} must be >= 0")
    n = (out.get("eval") or {}).get("n")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ConfigError(f"eval.n={n!r} must be a positive number of test examples, or null for the whole test set")
    if "seed" in out and (isinstance(out["seed"], bool) or not isinstance(out["seed"], int)):
        raise ConfigError(f"seed={out['seed']!r}: expected an integer")
    if "seed" in out and not 0 <= out["seed"] <= SEED_MAX:
        raise ConfigError(f"seed={out['seed']!r} is outside the seeds torch and numpy take: choose an integer in "
                          f"[0, 2**64 - 1]")
    if "optim" in out:
        _check_betas(out["optim"].get("betas"))
    if "arch" in out:
        options = _check_arch(out["arch"])
        if method is not None:
            _check_method_takes_arch(method, out["arch"]["name"], options)
    if "dataset" in out:
        _check_dataset_sizes(out["dataset"], n)
    if "attack" in raw:
        _check_attack_names(overrides)
    _check_optional_packages(out)
    return OmegaConf.create(out)


def _check_betas(betas: Any) -> None:
    if betas is None:
        return
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ConfigError(f"optim.betas={betas!r}: Adam's betas are exactly two numbers in [0, 1), e.g. [0.9, 0.999]")


def _check_arch(arch: dict) -> dict:
    from advtrain.models import check_arch

    return check_arch(arch["name"], depth=arch.get("depth"), widen_factor=arch.get("widen_factor"),
                      dropout=arch.get("dropout", 0.0))


def _check_dataset_sizes(dataset: dict, eval_n: int | None) -> None:
    """mean/std and eval.n against the dataset's channels and test set, where they are known before any file is
    read (the data build checks mean/std again once the images are read)."""
    from advtrain.data.build import known_sizes

    std = dataset.get("std") or []
    if any(s <= 0 for s in std):
        raise ConfigError(f"dataset.std={std!r}: the per-channel standard deviations the model divides by must be > 0")
    channels, n_test = known_sizes(dataset)
    for key in ("mean", "std"):
        values = dataset.get(key)
        if channels is not None and values is not None and len(values) not in (1, channels):
            raise ConfigError(f"dataset.{key}={values!r} has {len(values)} values but {dataset['name']} images have "
                              f"{channels} channel{'s' * (channels != 1)}: give one value per channel, or one for all")
    check_eval_n(eval_n, n_test, dataset.get("name"))


def check_eval_n(n: int | None, n_test: int | None, dataset: str | None = None) -> None:
    """eval.n beyond the test set would be recorded in results.json as the number evaluated while fewer were; call it
    with data.test.n_examples once the data is built where the size was not known before (dataset=imagefolder)."""
    if n is not None and n_test is not None and n > n_test:
        where = f" of {dataset}" if dataset else ""
        raise ConfigError(f"eval.n={n} is more than the {n_test} test examples{where}: choose at most {n_test}, "
                          "or eval.n=null for the whole test set")


def _check_attack_names(overrides: list[str] | None) -> None:
    """Composing attack=[pgd20,pgd20] merges the two into one entry, so the suite would run one attack where two
    were asked for: only the overrides still show the repetition."""
    if overrides is None:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return
        overrides = list(HydraConfig.get().overrides.task)
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # Hydra has parsed these already; an override it takes and this parser does not is no repeat
        return
    for override in parsed:
        if override.key_or_group != "attack" or not isinstance(override.value(), list):
            continue
        names = [str(name) for name in override.value()]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ConfigError(f"attack={override.get_value_element_as_str()} names {repeated[0]} more than once; name "
                              f"each attack once, e.g. attack=[{','.join(dict.fromkeys(names))}]")


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


def _check_method(section: Any) -> tuple[type, dict]:
    """The method class the section selects (its module alone is imported: each pulls in torch code of its own),
    and the section checked against the class's Config."""
    from advtrain.methods import UnknownMethod, method_class

    try:
        cls = method_class(section if isinstance(section, dict) else {"name": section})
    except UnknownMethod as e:
        raise ConfigError(str(e)) from None
    out = _check_section(section, cls.Config, "method")
    if out.get("_target_") is None:  # only a method outside advtrain names its class: the others' sections (and
        out.pop("_target_", None)    # the checkpoints a run resumes from) stay as they were
    return cls, out


def _pop_method_settings(cfg: DictConfig) -> tuple[DictConfig, dict]:
    """(the config without method_settings, the chosen method's entry of it, resolved). A sweep over methods (a
    comparison preset) gives each method settings of its own there, e.g. RRM's teacher, which the others would
    refuse; only the chosen method's entry is resolved (the teacher's path may name the sweep's folder)."""
    if "method_settings" not in cfg:
        return cfg, {}
    settings = cfg.method_settings
    if settings is None:
        settings = {}
    elif not OmegaConf.is_dict(settings):
        raise ConfigError(f"method_settings={settings!r}: expected a mapping of method name -> its settings, e.g. "
                          "method_settings.rrm.teacher=<checkpoint>")
    names = sorted(p.stem for p in (Path(__file__).parent / "conf" / "method").glob("*.yaml"))  # no torch import
    for key in settings:
        if key not in names:
            raise ConfigError(f"method_settings.{key}: there is no method {key!r}{did_you_mean(key, key, names)}; "
                              f"methods: {', '.join(names)}")
    chosen = OmegaConf.select(cfg, "method.name", default=None) if OmegaConf.is_dict(cfg.get("method")) else \
        cfg.get("method")
    own = settings.get(chosen) if chosen in settings else None
    if own is not None and not OmegaConf.is_dict(own):
        raise ConfigError(f"method_settings.{chosen}={own!r}: expected the method's settings, e.g. "
                          f"method_settings.{chosen}.<key>=<value>")
    own = OmegaConf.to_container(own, resolve=True) if own is not None else {}
    return OmegaConf.masked_copy(cfg, [k for k in cfg if k != "method_settings"]), own


def _check_method_takes_arch(method: type, arch: str, options: dict) -> None:
    """A method that cannot change the chosen architecture (method=oat conditions BatchNorm layers, arch=mnist_net
    has none) is refused here, not once the data is read and the model built."""
    from advtrain.methods import Method

    if method.check_model.__func__ is Method.check_model.__func__:
        return  # takes any architecture: nothing to build
    import torch

    from advtrain.models import ARCHS, Classifier, Normalize

    # On the CPU, not the meta device: meta's Python kernels import torch._dynamo, slower than building wrn34_10.
    try:
        with torch.no_grad():
            body, head = ARCHS[arch]((3, 32, 32), 10, **options)
    except Exception:  # noqa: BLE001 - not buildable for these nominal images: the real build says why, if at all
        return
    method.check_model(Classifier(Normalize([0.0], [1.0]), body, head, arch=arch))


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


# The trainer keys an evaluation reads: where it runs and in what precision (and devices, which must be 1).
EVAL_TRAINER_KEYS = ("accelerator", "precision", "devices")


def check_eval_trainer(trainer: Any) -> None:
    """advtrain-eval's trainer section (`cfg.trainer` of its composed config, conf/eval.yaml: accelerator and
    precision unless the user added keys with +trainer.KEY=...). A training-only key there (+trainer.epochs=3) would
    be accepted and ignored, so it is refused, naming the keys that do change an evaluation."""
    if trainer is None:
        return
    if not isinstance(trainer, (dict, DictConfig)):
        raise ConfigError(f"trainer={trainer!r}: expected a config group (a mapping), not a single value")
    extra = [key for key in trainer if key not in EVAL_TRAINER_KEYS]
    if extra:
        raise ConfigError(f"trainer.{extra[0]} has no effect on advtrain-eval, which evaluates a trained checkpoint; "
                          "the trainer keys it takes: accelerator, precision (and devices, which must be 1)")
