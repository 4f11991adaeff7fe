"""SIGTERM / SIGUSR1 (cluster preemption, `scancel`, time limits) become a flag the loop checks between steps."""
from __future__ import annotations

import signal
from contextlib import contextmanager


class Interrupted(Exception):
    """Raised by the loop after it has written a checkpoint in response to a signal."""

    def __init__(self, signum: int, checkpoint: str):
        self.signum = signum
        self.checkpoint = checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name}; checkpoint written to {checkpoint}; "
                         "run the same command with resume=auto to continue")


class SignalFlag:
    def __init__(self):
        self.signum: int | None = None

    def __bool__(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        self.signum = signum


@contextmanager
def catch_signals(*signums: int):
    flag = SignalFlag()
    previous = {s: signal.signal(s, flag._handle) for s in signums}
    try:
        yield flag
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
