"""Weights & Biases tracking, rank 0 only.

The run's config is the resolved Hydra config. Without credentials the run is offline (synced later with
`wandb sync`) and never prompts for a login. Robust accuracy is logged against training wall-clock
(`train_time_s`) as well as against the epoch, so methods with different costs compare on one axis.

Sweeps. The jobs of one `advtrain -m` sweep share a W&B group, the sweep folder's name (unless `logger.group` is
set). A run's W&B id is kept in its run directory (`wandb/run_id`), so a job that resumes there (`resume=auto`
after preemption or a requeue) continues its W&B run instead of starting another; a new run directory, including
one recreated after deleting the old, gets a fresh id, so a deleted W&B run is never reused.
"""
from __future__ import annotations

import netrc
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

RUN_ID_FILE = Path("wandb") / "run_id"  # under the run directory


def has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_mode(mode: str) -> str:
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if has_credentials() else "offline"


def sweep_group() -> str | None:
    """The sweep folder's name when this process is a job of a Hydra multirun, else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():  # train() called directly, e.g. from a test or a notebook
        return None
    hydra_cfg = HydraConfig.get()
    return Path(str(hydra_cfg.sweep.dir)).name if hydra_cfg.mode == RunMode.MULTIRUN else None


def run_id(run_dir: Path) -> str:
    """This run directory's W&B run id: made on its first run, read back when a run resumes there."""
    path = run_dir / RUN_ID_FILE
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    # Random rather than a hash of the path: the same path on another machine, or a sweep rerun after its folder
    # was deleted, must not append to (or be refused as) an earlier run of the project.
    new_id = secrets.token_hex(8)
    path.write_text(new_id + "\n")
    return new_id


class WandbLogger:
    def __init__(self, cfg, config: Mapping[str, Any], run_dir: Path):
        import wandb

        self.mode = resolve_mode(cfg.mode)
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, group=cfg.group or sweep_group(),
                              tags=list(cfg.tags), name=cfg.run_name, config=dict(config), dir=str(run_dir),
                              mode=self.mode, id=run_id(run_dir), resume="allow",
                              settings=wandb.Settings(console="off", silent=True))
        self.run.define_metric("epoch")
        self.run.define_metric("train_time_s")
        self.run.define_metric("train/*", step_metric="epoch")
        self.run.define_metric("method/*", step_metric="epoch")  # schedules (DEAT's r, G, threshold), guards
        self.run.define_metric("eval/*", step_metric="train_time_s")

    def log(self, metrics: Mapping[str, Any]) -> None:
        self.run.log(dict(metrics))

    def summary(self, values: Mapping[str, Any]) -> None:
        self.run.summary.update(dict(values))

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


class NullLogger:
    mode = "disabled"

    def log(self, metrics: Mapping[str, Any]) -> None:
        pass

    def summary(self, values: Mapping[str, Any]) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


def build_logger(cfg, config: Mapping[str, Any], run_dir: Path):
    if cfg.name == "none" or resolve_mode(cfg.mode) == "disabled":
        return NullLogger()
    return WandbLogger(cfg, config, run_dir)
