"""A W&B outage never stops training: the run goes offline in its run directory and says so in one line."""
from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import wandb
from conftest import TINY, run_cli
from wandb_records import read_run

from advtrain.engine.signals import Interrupted
from advtrain.logging import wandb_logger
from advtrain.logging.wandb_logger import WandbLogger

FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"  # 40 characters, like a real API key


def _refusing_port() -> int:
    """A local port with nothing listening: connections to it are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SilentServer:
    """Accepts connections and never answers, like a server that hangs (or a firewall that swallows packets)."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.5)  # how often the accepting thread looks at `stop`
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                self.held.append(self.sock.accept()[0])
            except TimeoutError:
                continue

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        for conn in self.held:
            conn.close()
        self.sock.close()


def _train_against(port: int, run_dir: Path):
    online = {"WANDB_MODE": None, "WANDB_API_KEY": FAKE_KEY, "WANDB_BASE_URL": f"http://127.0.0.1:{port}",
              "NETRC": None, "HOME": str(run_dir.parent)}  # HOME: no ~/.netrc or W&B settings of this machine
    args = [*[a for a in TINY if a != "logger=none"], "logger=wandb", "logger.project=advtrain-test",
            "logger.init_timeout_s=5", "method=natural", f"hydra.run.dir={run_dir}"]
    return run_cli(args, cwd=run_dir.parent, env=online, timeout=300)


def _assert_trained_offline(proc, run_dir: Path) -> None:
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if "W&B" in line]
    assert len(warnings) == 1, proc.stderr
    assert "within 5 s" in warnings[0] and "offline" in warnings[0] and "wandb sync" in warnings[0], warnings[0]
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["eval"]) >= {"clean", "pgd20"}
    # Offline under the run directory's own id, so that `wandb sync` fills in the same W&B run.
    run_id = (run_dir / "wandb" / "run_id").read_text().strip()
    files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert [f.name for f in files] == [f"run-{run_id}.wandb"]
    final = [row for row in read_run(files[0])["history"] if "eval/pgd20" in row]
    assert final and final[-1]["eval/pgd20"] == pytest.approx(results["eval"]["pgd20"])


@pytest.mark.slow
def test_refused_connection_trains_offline(tmp_path):
    run_dir = tmp_path / "run"
    _assert_trained_offline(_train_against(_refusing_port(), run_dir), run_dir)


@pytest.mark.slow
def test_server_that_never_answers_trains_offline(tmp_path):
    run_dir = tmp_path / "run"
    with SilentServer() as server:
        proc = _train_against(server.port, run_dir)
    assert server.held, "W&B never tried the server"
    _assert_trained_offline(proc, run_dir)


# --- the logger alone, with wandb.init replaced ---------------------------------------------------------------

def _cfg(mode: str = "online"):
    return SimpleNamespace(mode=mode, project="p", entity=None, group=None, tags=[], run_name=None,
                           init_timeout_s=5)


def _warnings(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if "warning" in line]


def test_failing_log_summary_finish_warn_once_and_never_raise(tmp_path, capsys):
    run = mock.MagicMock()
    run.log.side_effect = wandb.errors.CommError("connection reset by peer")
    run.summary.update.side_effect = wandb.errors.CommError("still down")
    run.finish.side_effect = BrokenPipeError("service gone")
    with mock.patch.object(wandb, "init", return_value=run):
        logger = WandbLogger(_cfg("offline"), {}, tmp_path)
    for epoch in range(3):
        logger.log({"epoch": epoch, "train/loss": 1.0})
    logger.summary({"final/clean": 0.9})
    logger.finish(0)
    (line,) = _warnings(capsys)
    assert "W&B log failed" in line and "connection reset by peer" in line and "dropped" in line
    assert run.log.call_count == 1  # a broken run is not retried every epoch


def test_failing_finish_alone_warns_and_does_not_raise(tmp_path, capsys):
    run = mock.MagicMock()
    run.finish.side_effect = wandb.errors.CommError("upload failed")
    with mock.patch.object(wandb, "init", return_value=run):
        logger = WandbLogger(_cfg("offline"), {}, tmp_path)
    logger.log({"epoch": 1})
    logger.finish(0)
    logger.finish(0)
    (line,) = _warnings(capsys)
    assert "W&B finish failed" in line
    run.finish.assert_called_once_with(exit_code=0)


def test_a_stop_signal_inside_wandb_still_stops_the_run(tmp_path):
    run = mock.MagicMock()
    run.log.side_effect = Interrupted(15, None, phase="during the final evaluation", run_dir=tmp_path)
    with mock.patch.object(wandb, "init", return_value=run):
        logger = WandbLogger(_cfg("offline"), {}, tmp_path)
    with pytest.raises(Interrupted):
        logger.log({"epoch": 1})


def test_online_start_that_fails_goes_offline_under_the_same_id(tmp_path, capsys):
    offline_run = mock.MagicMock()

    def init(mode, **kwargs):
        if mode == "online":
            raise wandb.errors.CommError("Failed to get resume status for run x: context deadline exceeded\n"
                                         'while retrying: Post "http://127.0.0.1:9/graphql": dial tcp '
                                         "127.0.0.1:9: connect: connection refused")
        return offline_run

    with mock.patch.object(wandb, "init", side_effect=init) as fake_init, \
            mock.patch.object(wandb, "teardown") as teardown, \
            mock.patch("wandb.analytics.opentelemetry.opentelemetry_proxy.disable") as no_telemetry:
        logger = WandbLogger(_cfg("online"), {}, tmp_path)
    assert logger.run is offline_run and logger.mode == "offline"
    teardown.assert_called_once()  # the failed run's id is freed in the service before the offline start
    no_telemetry.assert_called_once()  # else W&B's telemetry probes the dead server again at exit
    online, offline = fake_init.call_args_list
    assert offline.kwargs["mode"] == "offline" and offline.kwargs["id"] == online.kwargs["id"]
    assert offline.kwargs["id"] == wandb_logger.run_id(tmp_path)
    assert online.kwargs["settings"].init_timeout == 5
    (line,) = _warnings(capsys)
    assert "could not be reached within 5 s (connection refused)" in line
    assert f"wandb sync {tmp_path / 'wandb'}/offline-run-*" in line


@pytest.mark.slow
def test_a_w_and_b_service_inherited_from_the_parent_does_not_block_the_offline_fallback(tmp_path):
    """A process that used W&B (a notebook, an agent, this test runner) hands its service to its children through
    WANDB_SERVICE; that service keeps a failed start's run id, so the offline fallback must start its own."""
    import wandb

    wandb.teardown()  # a fresh service of this process's own, which wandb then shares through WANDB_SERVICE
    run = wandb.init(mode="offline", dir=str(tmp_path), project="advtrain-test",
                     settings=wandb.Settings(console="off", silent=True))
    try:
        service = os.environ.get("WANDB_SERVICE")
        assert service, "wandb no longer shares its service through WANDB_SERVICE: this test checks nothing"
        run_dir = tmp_path / "run"
        online = {"WANDB_MODE": None, "WANDB_API_KEY": FAKE_KEY, "WANDB_BASE_URL": f"http://127.0.0.1:{_refusing_port()}",
                  "NETRC": None, "HOME": str(tmp_path), "WANDB_SERVICE": service}
        args = [*[a for a in TINY if a != "logger=none"], "logger=wandb", "logger.project=advtrain-test",
                "logger.init_timeout_s=5", "method=natural", f"hydra.run.dir={run_dir}"]
        _assert_trained_offline(run_cli(args, cwd=tmp_path, env=online, timeout=300), run_dir)
    finally:
        run.finish()
        wandb.teardown()
