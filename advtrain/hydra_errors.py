"""One-line descriptions of the errors Hydra and OmegaConf raise while composing a config (a bad override, an
unknown key or option), in the words of advtrain's own config errors. Imports no torch: `advtrain --help` and a bad
command line must answer at once."""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from advtrain.config import TOP_LEVEL, _unknown_key
from advtrain.schema import TRAIN_SECTIONS


def describe_hydra_error(e: BaseException) -> str | None:
    """One line for an error Hydra or OmegaConf raised while composing the config; None if it is not one."""
    from hydra.errors import HydraException, MissingConfigException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    if not isinstance(e, (HydraException, OmegaConfBaseException)):
        return None
    cause = e.__cause__
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and cause.full_key:
        full_key = str(cause.full_key)
        section, _, key = full_key.rpartition(".")
        if not section:  # the top level takes no new keys: check_config would refuse a +key as well
            return _unknown_key(full_key, key, sorted(TOP_LEVEL))
        chosen = _chosen_keys(section, cause.parent_node)
        if chosen is not None and key in _valid_keys(section):
            return (f"'{full_key}' is not a setting of the chosen {section} option; it takes: "
                    f"{', '.join(chosen)}")
        if key in _valid_keys(section):
            return f"'{full_key}' is not a setting of the chosen {section} option (other {section} options take it)"
        return _unknown_key(full_key, key, _valid_keys(section)) + f" (to add a new key on purpose: +{full_key}=...)"
    if isinstance(e, MissingConfigException) and e.missing_cfg_file and "/" in str(e.missing_cfg_file):
        group, _, option = str(e.missing_cfg_file).rpartition("/")
        options = sorted(p.stem for p in (Path(__file__).parent / "conf" / group).glob("*.yaml"))
        if options:
            return f"{group}={option} is not an option; choose one of: {', '.join(options)}"
    return _first_line(e)


def _chosen_keys(section: str, node) -> list[str] | None:
    """The keys the chosen option of `section` takes (a method's own schema), where the failing node names it."""
    if section != "method":
        return None
    from advtrain.methods import method_class

    try:
        cls = method_class({k: node.get(k) for k in ("name", "_target_")})
    except Exception:  # noqa: BLE001 - an unreadable node or an unknown method: fall back to the general message
        return None
    return [f.name for f in fields(cls.Config) if f.name != "_target_"]


def _valid_keys(section: str) -> list[str]:
    if section in TRAIN_SECTIONS:
        return [f.name for f in fields(TRAIN_SECTIONS[section])]
    if section == "method":
        from advtrain.methods import discover  # the plug-ins' own schemas live beside their torch code

        return sorted({f.name for m in discover().values() for f in fields(m.Config)} - {"_target_"})
    return []


def _first_line(e: BaseException) -> str:
    text = " ".join(line.strip() for line in str(e).strip().splitlines() if line.strip())
    return text.replace("\t", " ")[:400]
