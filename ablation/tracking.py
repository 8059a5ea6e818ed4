"""The logger interface `train` reports through, and its implementations (W&B, memory, fan-out, none)."""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from ablation.errors import TrackingError


class Logger(Protocol):
    """What `train` calls: per-epoch metrics, per-batch progress, and the final summary."""

    def log(self, metrics: dict[str, Any], step: int) -> None: ...

    def progress(self, done: int, total: int) -> None: ...

    def summary(self, metrics: dict[str, Any]) -> None: ...


class NullLogger:
    """Discards everything."""

    def log(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def progress(self, done: int, total: int) -> None:
        pass

    def summary(self, metrics: dict[str, Any]) -> None:
        pass


class MemoryLogger:
    """Keeps the history and summary in lists/dicts (tests, the local store)."""

    def __init__(self) -> None:
        self.history: list[dict[str, Any]] = []
        self.final: dict[str, Any] = {}

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.history.append({**metrics, "epoch": step})

    def progress(self, done: int, total: int) -> None:
        pass

    def summary(self, metrics: dict[str, Any]) -> None:
        self.final.update(metrics)


class FanOut:
    """Sends every call to several loggers (e.g. W&B and the terminal)."""

    def __init__(self, *loggers: Logger) -> None:
        self.loggers = loggers

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for logger in self.loggers:
            logger.log(metrics, step)

    def progress(self, done: int, total: int) -> None:
        for logger in self.loggers:
            logger.progress(done, total)

    def summary(self, metrics: dict[str, Any]) -> None:
        for logger in self.loggers:
            logger.summary(metrics)


class WandbLogger:
    """Logs to an already started W&B run (online or offline)."""

    def __init__(self, run: Any) -> None:
        self.run = run

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log({**metrics, "epoch": step}, step=step)

    def progress(self, done: int, total: int) -> None:
        pass

    def summary(self, metrics: dict[str, Any]) -> None:
        self.run.summary.update(metrics)


def wandb_logged_in() -> bool:
    """True when W&B credentials exist (WANDB_API_KEY or a netrc entry for the W&B host)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or ""
    path = Path(os.environ.get("NETRC", "~/.netrc")).expanduser()
    try:
        return path.exists() and netrc.netrc(str(path)).authenticators(host) is not None
    except (netrc.NetrcParseError, OSError):
        return False


def wandb_mode(requested: str) -> str:
    """Resolve `auto` to `online` when logged in to W&B, else `offline` (runs `wandb sync` can upload)."""
    if requested != "auto":
        return requested
    return os.environ.get("WANDB_MODE") or ("online" if wandb_logged_in() else "offline")


def start_wandb(config: dict[str, Any], mode: str, project: str, **kwargs: Any) -> Any:
    """Start a W&B run in `mode` (online, offline or disabled) with the run config."""
    import wandb

    settings = wandb.Settings(silent=True, console="off", x_disable_stats=True)
    try:
        return wandb.init(project=project, config=config, mode=mode, settings=settings, **kwargs)
    except Exception as exc:  # wandb raises many types (CommError, UsageError, timeouts)
        raise TrackingError(
            f"could not start a W&B {mode} run ({type(exc).__name__}: {_one_line(exc)}); "
            f"run `wandb login`, or use --wandb offline"
        ) from None


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())[:200]
