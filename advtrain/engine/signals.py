"""Stop signals (cluster preemption, `scancel`, time limits) become a flag the loop checks between steps.

SIGTERM and SIGUSR1 stop the run after a checkpoint. SIGUSR2 is submitit's "time limit near / preempted" signal:
the loop writes its checkpoint first and then hands the signal to the handler that was installed before ours
(submitit's, which requeues the job; the requeued job resumes from the checkpoint with resume=auto).
"""
from __future__ import annotations

import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class Interrupted(Exception):
    """Raised by the loop after it has written a checkpoint in response to a signal."""

    def __init__(self, signum: int, checkpoint: str, previous_handler=None):
        self.signum = signum
        self.checkpoint = checkpoint
        # What the process did with this signal before training caught it (submitit's requeue), if anything.
        self.chain: Callable | None = previous_handler if callable(previous_handler) else None
        run_dir = Path(checkpoint).parent.parent
        super().__init__(f"stopped by {signal.Signals(signum).name}; checkpoint written to {checkpoint}; to "
                         f"continue, rerun the command (a sweep finds its folders again; a single run needs "
                         f"hydra.run.dir={run_dir}): resume=auto, the default, picks it up")


class SignalFlag:
    def __init__(self):
        self.signum: int | None = None
        self.previous: dict[int, object] = {}

    def __bool__(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        self.signum = signum


@contextmanager
def catch_signals(*signums: int):
    flag = SignalFlag()
    flag.previous = {s: signal.signal(s, flag._handle) for s in signums}
    try:
        yield flag
    finally:
        for s, handler in flag.previous.items():
            signal.signal(s, handler)
