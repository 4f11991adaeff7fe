"""The errors a user can cause, and one-line descriptions of Hydra's composition errors."""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from advtrain.config import ConfigError, _unknown_key
from advtrain.schema import TRAIN_SECTIONS
from advtrain.data import DataError
from advtrain.engine.checkpoint import CheckpointError
from advtrain.engine.launch import RankError
from advtrain.engine.loop import TrainingError

USER_ERRORS = (ConfigError, DataError, CheckpointError, TrainingError, RankError)


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
        if key in _valid_keys(section):
            return f"'{full_key}' is not a setting of the chosen {section} option (other {section} options take it)"
        return _unknown_key(full_key, key, _valid_keys(section)) + f" (to add a new key on purpose: +{full_key}=...)"
    if isinstance(e, MissingConfigException) and e.missing_cfg_file and "/" in str(e.missing_cfg_file):
        group, _, option = str(e.missing_cfg_file).rpartition("/")
        options = sorted(p.stem for p in (Path(__file__).parent / "conf" / group).glob("*.yaml"))
        if options:
            return f"{group}={option} is not an option; choose one of: {', '.join(options)}"
    return _first_line(e)


def _valid_keys(section: str) -> list[str]:
    from advtrain.methods import METHODS

    if section in TRAIN_SECTIONS:
        return [f.name for f in fields(TRAIN_SECTIONS[section])]
    if section == "method":
        return sorted({f.name for m in METHODS.values() for f in fields(m.Config)})
    return []


def _first_line(e: BaseException) -> str:
    text = " ".join(line.strip() for line in str(e).strip().splitlines() if line.strip())
    return text.replace("\t", " ")[:400]
