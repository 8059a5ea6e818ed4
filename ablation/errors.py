"""The small error hierarchy: every error a user can cause is a `LenetError` with a message that says the fix."""


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
