"""One-line descriptions of the errors Hydra and OmegaConf raise while composing a config (a bad override, an
unknown key or option), in the words of advtrain's own config errors. Imports no torch: `advtrain --help` and a bad
command line must answer at once."""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from advtrain.config import TOP_LEVEL, _unknown_key, did_you_mean, nearest
from advtrain.schema import TRAIN_SECTIONS, AttackConfig

CONF = Path(__file__).parent / "conf"


def describe_hydra_error(e: BaseException) -> str | None:
    """One line for an error Hydra or OmegaConf raised while composing the config; None if it is not one."""
    from hydra.errors import HydraException, MissingConfigException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    if not isinstance(e, (HydraException, OmegaConfBaseException)):
        return None
    cause = e.__cause__
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and cause.full_key:
        return _unknown_key_in(str(cause.full_key), cause.parent_node)
    if isinstance(e, MissingConfigException) and e.missing_cfg_file and "/" in str(e.missing_cfg_file):
        group, _, option = str(e.missing_cfg_file).rpartition("/")
        options = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
        if options and group == "recipe":  # recipe: ${dataset}: a dataset of the user's own brings none
            return (f"recipe={option} is not an option: a dataset of your own needs a recipe/{option}.yaml beside "
                    f"its dataset/{option}.yaml (`# @package _global_` and `defaults: [cifar10]` trains with SGD and "
                    f"the piecewise LR, [mnist] with Adam and the triangle LR), or recipe=<one of: "
                    f"{', '.join(options)}> on the command line")
        if options:
            return f"{group}={option} is not an option; choose one of: {', '.join(options)}"
    return _first_line(e)


def _unknown_key_in(full_key: str, node) -> str:
    """A key the composed config does not hold. Answered from the composed node and the YAMLs alone: importing the
    methods' torch code to list their settings took seconds (minutes on a cold disk) to answer a typo."""
    section, _, key = full_key.rpartition(".")
    if not section:  # the top level takes no new keys: check_config would refuse a +key as well
        return _unknown_key(full_key, key, sorted(TOP_LEVEL))
    chosen = _keys_of(node)
    known = _section_keys(section)
    if key in known:
        if section.startswith("attack."):  # an entry holds only the keys it sets; its type decides the rest
            return f"'{full_key}' is not set by attack {section[len('attack.'):]}: add it with +{full_key}=..."
        if chosen is None:
            return f"'{full_key}' is not a setting of the chosen {section} option (other {section} options take it)"
        return (f"'{full_key}' is not a setting of the chosen {section} option{did_you_mean(full_key, key, chosen)}; "
                f"it takes: {', '.join(k for k in chosen if not k.startswith('_'))}")
    # No schema of the section takes the key, so a +key would be refused by the config check: no hint to add it.
    if chosen is None:
        return _unknown_key(full_key, key, known)
    elsewhere = nearest(full_key, key, known) if nearest(full_key, key, chosen) is None else None
    hint = f" (other {section} options take {elsewhere})" if elsewhere else ""  # logger.projet under logger=none
    return _unknown_key(full_key, key, chosen, hint=hint)


def _keys_of(node) -> list[str] | None:
    from omegaconf import DictConfig

    return [str(k) for k in node.keys()] if isinstance(node, DictConfig) else None


def _section_keys(section: str) -> list[str]:
    """The keys some option of `section` takes."""
    if section in TRAIN_SECTIONS:
        return [f.name for f in fields(TRAIN_SECTIONS[section])]
    if section.startswith("attack.") and section.count(".") == 1:
        return [f.name for f in fields(AttackConfig)]
    if section == "method":  # each shipped YAML lists exactly its Config's fields (test_method_plugins holds it)
        from omegaconf import OmegaConf

        return sorted({str(k) for p in (CONF / "method").glob("*.yaml") for k in OmegaConf.load(p)})
    return []


def _first_line(e: BaseException) -> str:
    text = " ".join(line.strip() for line in str(e).strip().splitlines() if line.strip())
    return text.replace("\t", " ")[:400]
