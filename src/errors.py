"""Errors the command line turns into one clear line instead of a traceback."""


class UserError(Exception):
    """Something the user asked for or supplied cannot work: reported in one line, exit code 2."""


class DataUnavailable(UserError):
    """Data files are missing, unreadable or malformed, and could not be downloaded."""


class TrainingStopped(Exception):
    """A run that started but had to stop (for example a loss that turned NaN).

    Carries the ``status`` written to summary.json and a one-line ``reason``.
    """

    def __init__(self, status: str, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


class WriteFailed(OSError):
    """A run's file could not be written (a full disk, a read-only folder): the run is marked failed,
    the previous version of the file (the last good checkpoint) stays in place."""
