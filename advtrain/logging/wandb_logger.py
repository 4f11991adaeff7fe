"""Weights & Biases tracking, rank 0 only.

The run's config is the resolved Hydra config. Without credentials the run is offline (synced later with
`wandb sync`) and never prompts for a login. Robust accuracy is logged against training wall-clock
(`train_time_s`) as well as against the epoch, so methods with different costs compare on one axis.
"""
from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlparse


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


class WandbLogger:
    def __init__(self, cfg, config: Mapping[str, Any], run_dir: Path):
        import wandb

        self.mode = resolve_mode(cfg.mode)
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, group=cfg.group, tags=list(cfg.tags),
                              name=cfg.run_name, config=dict(config), dir=str(run_dir), mode=self.mode,
                              settings=wandb.Settings(console="off", silent=True))
        self.run.define_metric("epoch")
        self.run.define_metric("train_time_s")
        self.run.define_metric("train/*", step_metric="epoch")
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
