"""The small error hierarchy: every error a user can cause is a `LenetError` with a message that says the fix."""

from typing import Any


def missing_or_wrong(record: dict[str, Any], spec: dict[str, type | tuple[type, ...]]) -> str | None:
    """The first key of `spec` that `record` lacks or holds with another type, in words, or None."""
    for key, kind in spec.items():
        if key not in record:
            return f"no {key!r} entry"
        if not isinstance(record[key], kind):
            wanted = " or ".join(k.__name__ for k in kind) if isinstance(kind, tuple) else kind.__name__
            return f"{key!r} is a {type(record[key]).__name__}, not a {wanted}"
    return None


class LenetError(Exception):
    """Base class: the CLI prints the message on one line and exits with `exit_code`."""

    exit_code = 1  # a runtime error (Click's convention: 2 is a usage error)


class ConfigError(LenetError):
    """An unknown run setting, a bad value, or an unreadable config file: a usage error."""

    exit_code = 2


class DataError(LenetError):
    """Missing, truncated or corrupt dataset files, or a download that failed."""


class CheckpointError(LenetError):
    """A checkpoint that is missing, unreadable or incompatible with this version."""


class TrackingError(LenetError):
    """W&B could not start or log a run."""


class SweepError(LenetError):
    """A sweep file that W&B's schema or the run config rejects, or an unknown sweep id."""


class StoreError(LenetError):
    """The local sweep store is unreadable or corrupt."""


class OutputError(LenetError):
    """An output path that cannot be written: read-only, a file where a folder belongs, or a full disk."""


class StoreWriteError(StoreError, OutputError):
    """The store's disk is full or read-only: the file is intact and readable, but nothing can be written now."""


class Interrupted(LenetError):
    """Stopped by SIGTERM or SIGINT after cleaning up; the CLI then ends by that signal (shells show 128 + signum)."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum
