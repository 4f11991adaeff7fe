"""The errors a user can cause and fix: one leaf module, imported by every layer, importing nothing of advtrain.

Every one of them is reported by the CLI as ONE line on stderr with exit status 2, never a traceback; so each is
built from a one-line message (a wrapped library message that spans lines is joined).
"""
from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input or surroundings (config, data, checkpoint, a failed run), described in one
    line that names the bad value and what would be valid."""

    def __init__(self, message: str = ""):
        super().__init__(" ".join(str(message).split()))


class ConfigError(UserError, ValueError):
    """A config value that is unknown, of the wrong type or out of range."""


class DataError(UserError):
    """Missing, corrupt or misplaced dataset files."""


class CheckpointError(UserError):
    """A checkpoint that cannot be read safely, or does not match the run."""


class TrainingError(UserError):
    """Training itself failed in a way the user must fix (a NaN loss)."""


class RankError(UserError):
    """A user error raised on one rank of a multi-process run."""


class RankDied(UserError):
    """A rank ended without a word, mostly killed from outside (the kernel's OOM killer, kill -9). Not the user's
    input, but reported the same way: one line, exit status 2 (there is no traceback of the rank to show)."""


USER_ERRORS = (UserError,)
