"""The one exception the data package raises for problems a user can fix (missing or corrupt files, bad sizes)."""


class DataError(Exception):
    """A one-line, user-facing message; the CLI prints str(e) as it is, without a traceback."""

    def __init__(self, message: str):
        # Wrapped library messages sometimes span lines; the CLI contract is one line.
        super().__init__(" ".join(str(message).split()))
