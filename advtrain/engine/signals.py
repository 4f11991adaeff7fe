"""Stop signals (cluster preemption, `scancel`, time limits) become a flag the loop checks between steps.

SIGTERM, SIGUSR1 and SIGINT (Ctrl-C) stop the run after a checkpoint; a second Ctrl-C stops it at once. SIGUSR2 is submitit's "time limit near / preempted" signal:
the loop writes its checkpoint first and then hands the signal to the handler that was installed before ours
(submitit's, which requeues the job; the requeued job resumes from the checkpoint with resume=auto).

Outside the loop (loading data, building the model, the final evaluation) there is nothing new to save: a stop
signal ends the run at once, with the same one-line report and exit status, and the last checkpoint stands.
"""
from __future__ import annotations

import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


class Interrupted(BaseException):
    """A stop signal ended the run: raised by the loop after it has written a checkpoint (`checkpoint`), or outside
    the loop at once (`checkpoint` None; `phase` says where, `kept` which earlier checkpoint stands, if any).
    A BaseException, like KeyboardInterrupt: a request to stop, which no `except Exception` (a logging guard, a
    failed benchmark row) may swallow wherever the signal lands."""

    def __init__(self, signum: int, checkpoint: str | None, previous_handler=None, *, phase: str | None = None,
                 run_dir: Path | None = None, kept: str | None = None, then: str | None = None):
        self.signum = signum
        self.checkpoint = checkpoint
        if isinstance(previous_handler, StopAtOnce):  # the loop ran inside it: chain what was there before us
            previous_handler = previous_handler.previous.get(signum)
        # What the process did with this signal before training caught it (submitit's requeue), if anything; never
        # Python's own Ctrl-C handler, whose KeyboardInterrupt would only repeat the stop as a traceback.
        chainable = (callable(previous_handler) and previous_handler is not signal.default_int_handler
                     and not isinstance(previous_handler, StopWhileStarting))
        self.chain: Callable | None = previous_handler if chainable else None
        name = signal.Signals(signum).name
        if checkpoint is not None:
            run_dir, saved = Path(checkpoint).parent.parent, f"checkpoint written to {checkpoint}"
        else:
            saved = f"the checkpoint {kept} stands" if kept else "no checkpoint had been written yet"
        where = f" {phase}" if phase else ""
        rerun = f"a single run needs hydra.run.dir={run_dir}" if run_dir is not None else "with the same run directory"
        if then is None:  # what stands and how to go on; `then` says it where there is no training to resume
            then = (f"{saved}; to continue, rerun the command (a sweep finds its folders again; {rerun}): "
                    "resume=auto, the default, picks it up")
        super().__init__(f"stopped by {name}{where}; {then}")


class StopWhileStarting:
    """SIGINT or SIGTERM before a run has anything to save (composing the config, importing torch, loading data):
    one line and out at once, with exit status 128 + the signal. Raising instead would unwind through whatever
    import the signal landed in, leaving half-initialised modules for the error path to trip over. The run's own
    handlers replace this one once there is something to save; the kernel releases the run directory's lock."""

    def __init__(self, program: str, cleanup: Callable[[], None]):
        self.program, self.cleanup = program, cleanup

    @classmethod
    def install(cls, program: str, cleanup: Callable[[], None]) -> None:
        handler = cls(program, cleanup)
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, handler)

    def __call__(self, signum, frame) -> None:
        print(f"{self.program}: stopped by {signal.Signals(signum).name} while starting up, before training or "
              "evaluation began; nothing of this run needed saving: rerun the command to start it (a run with a "
              "checkpoint continues from it)", file=sys.stderr, flush=True)
        try:  # e.g. a run folder holding only Hydra's files goes, as after any failed start
            self.cleanup()
        except Exception:  # noqa: BLE001 - the stop matters more than a leftover empty folder
            pass
        os._exit(128 + signum)


class StopNow(KeyboardInterrupt):
    """A second Ctrl-C while the first one's checkpoint is being written: stop without waiting for it."""


class StopAtOnce:
    """Signal handler outside the loop: raise Interrupted where the program is. `phase` is kept current by the
    caller ("while loading the data", "during the final evaluation")."""

    def __init__(self, run_dir: Path, kept: Callable[[], str | None], then: str | None = None):
        self.run_dir, self.kept, self.then = run_dir, kept, then
        self.phase = "before training started"
        self.previous: dict[int, object] = {}

    def __call__(self, signum, frame) -> None:
        raise Interrupted(signum, None, self, phase=self.phase, run_dir=self.run_dir, kept=self.kept(), then=self.then)


@contextmanager
def stop_at_once(run_dir: Path, kept: Callable[[], str | None], then: str | None = None):
    handler = StopAtOnce(run_dir, kept, then)
    handler.previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield handler
    finally:
        for s, previous in handler.previous.items():
            signal.signal(s, previous)


class SignalFlag:
    def __init__(self):
        self.signum: int | None = None
        self.previous: dict[int, object] = {}

    def __bool__(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signum is not None:
            raise StopNow  # Ctrl-C again while the checkpoint is on its way: the user wants out now
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
