"""Weights & Biases tracking, rank 0 only.

The run's config is the resolved Hydra config. Without credentials the run is offline (synced later with
`wandb sync`) and never prompts for a login. Robust accuracy is logged against training wall-clock
(`train_time_s`) as well as against the epoch, so methods with different costs compare on one axis.

Sweeps. The jobs of one `advtrain -m` sweep share a W&B group, the sweep folder's name (unless `logger.group` is
set). A run's W&B id is kept in its run directory (`wandb/run_id`), so a job that resumes there (`resume=auto`
after preemption or a requeue) continues its W&B run instead of starting another; a new run directory, including
one recreated after deleting the old, gets a fresh id, so a deleted W&B run is never reused.

Outages. Logging never stops training. An online start that fails (W&B unreachable within `logger.init_timeout_s`,
credentials refused) falls back to an offline run in the run directory, under the same run id so that `wandb sync`
fills in the same W&B run later, and says so in one line on stderr. A W&B call that fails later (`log`, `summary`,
`finish`) is reported once; the run's further W&B records are dropped and training goes on.
"""
from __future__ import annotations

import netrc
import os
import secrets
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

RUN_ID_FILE = Path("wandb") / "run_id"  # under the run directory
RETRY_WAITS_S = (0.0, 1.0, 2.0, 4.0)    # before each offline start after a failed online one


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


def warn(message: str) -> None:
    print(f"advtrain: warning: {message}", file=sys.stderr, flush=True)


def _short(e: BaseException) -> str:
    """The gist of an error for a one-line warning: wandb-core's messages chain their causes, most specific last
    (a first line "Failed to get resume status for run ...", a last "while retrying: ...: connection refused")."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    gist = lines[-1].rsplit(": ", 1)[-1] if lines else type(e).__name__
    return gist if len(gist) <= 100 else gist[:97] + "..."


# Every W&B call below catches Exception only: a stop signal raised inside W&B's code (advtrain's Interrupted, a
# KeyboardInterrupt) is a BaseException and ends the run rather than pass for a logging problem.

class WandbLogger:
    def __init__(self, cfg, config: Mapping[str, Any], run_dir: Path):
        import wandb

        self.mode = resolve_mode(cfg.mode)
        self.timeout_s = float(cfg.init_timeout_s)
        self.wandb_dir = run_dir / "wandb"
        self.init_args = dict(project=cfg.project, entity=cfg.entity, group=cfg.group or sweep_group(),
                              tags=list(cfg.tags), name=cfg.run_name, config=dict(config), dir=str(run_dir),
                              id=run_id(run_dir), resume="allow")
        self.run = self._start(wandb)
        self._guarded("setup", self._define_axes)

    def _init(self, wandb, mode: str):
        # silent also keeps login from asking the server who the user is (wandb_login._print_logged_in_message).
        settings = wandb.Settings(console="off", silent=True, init_timeout=self.timeout_s)
        return wandb.init(mode=mode, settings=settings, **self.init_args)

    def _start(self, wandb):
        """The W&B run: online if asked and W&B answers in time, else offline here; None if neither starts."""
        try:
            return self._init(wandb, self.mode)
        except Exception as e:
            if self.mode != "online":
                return self._without_wandb(f"W&B could not start ({_short(e)})")
            failure = e
        self.mode = "offline"
        try:
            run = self._offline_after_failed_start(wandb)
        except Exception as e:
            return self._without_wandb(f"W&B could not be reached ({_short(failure)}) nor start offline ({_short(e)})")
        warn(f"{_why_online_failed(wandb, failure, self.timeout_s)}; this run is logged offline under "
             f"{self.wandb_dir}; upload it later with: wandb sync {self.wandb_dir}/offline-run-*")
        return run

    def _offline_after_failed_start(self, wandb):
        """The offline start, after the failed online one is torn down. A service this process inherited from its
        parent (WANDB_SERVICE: a notebook, an agent, a test runner that used W&B) is not this process's to tear down
        and keeps the failed run's id: start a service of our own instead. On a loaded machine even our own can still
        hold the id for a moment ("run ID ... is in use"): tear down again and retry, a few seconds at most."""
        os.environ.pop("WANDB_SERVICE", None)
        for wait_s in RETRY_WAITS_S:
            _drop_failed_start(wandb)
            time.sleep(wait_s)
            try:
                return self._init(wandb, "offline")
            except Exception as e:
                if "in use" not in str(e) or wait_s == RETRY_WAITS_S[-1]:
                    raise

    def _without_wandb(self, why: str) -> None:
        warn(f"{why}; training goes on without W&B logging")
        self.mode = "disabled"

    def _define_axes(self) -> None:
        self.run.define_metric("epoch")
        self.run.define_metric("train_time_s")
        self.run.define_metric("train/*", step_metric="epoch")
        self.run.define_metric("method/*", step_metric="epoch")  # schedules (DEAT's r, G, threshold), guards
        self.run.define_metric("eval/*", step_metric="train_time_s")

    def _guarded(self, what: str, call) -> None:
        """Make a W&B call; after its first failure, warn and drop the run's later records rather than retry a
        broken run at every epoch."""
        if self.run is None:
            return
        try:
            call()
        except Exception as e:
            self.run, self.mode = None, "disabled"
            warn(f"W&B {what} failed ({_short(e)}); training goes on, the run's further W&B records are dropped "
                 f"(what was logged before is under {self.wandb_dir})")

    def log(self, metrics: Mapping[str, Any]) -> None:
        self._guarded("log", lambda: self.run.log(dict(metrics)))

    def summary(self, values: Mapping[str, Any]) -> None:
        self._guarded("summary", lambda: self.run.summary.update(dict(values)))

    def finish(self, exit_code: int = 0) -> None:
        if self.run is None:
            return
        offline = self.mode == "offline"
        self._guarded("finish", lambda: self.run.finish(exit_code=exit_code))
        if offline and self.run is not None:  # W&B itself is silenced: say where the run is and how to upload it
            print(f"W&B: offline run written under {self.wandb_dir}; upload it with: wandb sync "
                  f"{self.wandb_dir}/offline-run-*", flush=True)
        self.run = None


def _why_online_failed(wandb, e: Exception, timeout_s: float) -> str:
    if isinstance(e, wandb.errors.AuthenticationError):
        return f"W&B refused the credentials ({_short(e)})"
    return f"W&B could not be reached within {timeout_s:g} s ({_short(e)})"


def _drop_failed_start(wandb) -> None:
    """Undo what a failed online wandb.init left behind, so that the offline start can follow in this process."""
    # The failed run keeps its id registered in the wandb-core service ("run ID ... is in use" on the next init):
    # tear the service down (the offline start brings up a fresh one). Teardown calls sys.exit when the service
    # ends with a non-zero status, which must not end training either.
    try:
        wandb.teardown()
    except (Exception, SystemExit):
        pass
    # W&B's own error telemetry about the failure would probe the unreachable server again at exit (10 s per
    # probe against one that never answers); an offline run sends no telemetry anyway.
    try:
        from wandb.analytics.opentelemetry.opentelemetry_proxy import disable
    except ImportError:
        return
    disable()


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
