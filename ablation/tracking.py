"""The logger interface `train` reports through, and its implementations (W&B, memory, fan-out, none)."""

from __future__ import annotations

import os
from typing import Any, Protocol

from ablation.errors import TrackingError
from ablation.metrics import SUMMARIES


class Logger(Protocol):
    """What `train` calls: per-epoch metrics, progress (an epoch's batches, or a `stage` before the first epoch such
    as the teacher's view table), and the final summary."""

    def log(self, metrics: dict[str, Any], step: int) -> None: ...

    def progress(self, done: int, total: int, stage: str = "") -> None: ...

    def summary(self, metrics: dict[str, Any]) -> None: ...


class NullLogger:
    """Discards everything."""

    def log(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def progress(self, done: int, total: int, stage: str = "") -> None:
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

    def progress(self, done: int, total: int, stage: str = "") -> None:
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

    def progress(self, done: int, total: int, stage: str = "") -> None:
        for logger in self.loggers:
            logger.progress(done, total, stage)

    def summary(self, metrics: dict[str, Any]) -> None:
        for logger in self.loggers:
            logger.summary(metrics)


class WandbLogger:
    """Logs to an already started W&B run (online or offline), with `epoch` as every metric's x-axis."""

    def __init__(self, run: Any) -> None:
        self.run = run
        declare_metrics(run)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log({**metrics, "epoch": step}, step=step)

    def progress(self, done: int, total: int, stage: str = "") -> None:
        pass

    def summary(self, metrics: dict[str, Any]) -> None:
        self.run.summary.update(metrics)


def declare_metrics(run: Any) -> None:
    """`epoch` is the step metric of every metric; accuracy/loss summaries keep the best epoch (`SUMMARIES`)."""
    run.define_metric("epoch")
    run.define_metric("*", step_metric="epoch")
    for name, summary in SUMMARIES.items():
        run.define_metric(name, step_metric="epoch", summary=summary)


def wandb_logged_in() -> bool:
    """True when W&B has credentials (WANDB_API_KEY, `wandb login`, settings), as W&B itself looks them up;
    never prompts and never asks the server."""
    import wandb

    wandb.setup(wandb.Settings(silent=True))  # a non-silent login() asks the server who is logged in, to say so
    try:
        return bool(wandb.login(prompt=False, verify=False))
    except Exception as exc:  # a malformed key (wandb.errors.AuthenticationError)
        raise TrackingError(
            f"W&B credentials are unusable ({one_line(exc)}); run `wandb login --relogin` or unset WANDB_API_KEY"
        ) from None


def wandb_mode(requested: str) -> str:
    """Resolve `auto` to `online` when logged in to W&B, else `offline` (runs `wandb sync` can upload)."""
    if requested != "auto":
        return requested
    return os.environ.get("WANDB_MODE") or ("online" if wandb_logged_in() else "offline")


def start_wandb(config: dict[str, Any], mode: str, project: str, console: str = "wrap", **kwargs: Any) -> Any:
    """Start a W&B run in `mode` (online, offline or disabled) with the run config.

    `console="wrap"` keeps the process's console output (crash tracebacks included) as the run's output.log:
    a run started by `lenet train`, e.g. under a stock `wandb agent`, has no other record of why it crashed.
    "off" suits processes whose console is not the run's own (local-engine workers)."""
    import wandb

    settings = wandb.Settings(silent=True, console=console, x_disable_stats=True)
    try:
        return wandb.init(project=project, config=config, mode=mode, settings=settings, **kwargs)
    except Exception as exc:  # wandb raises many types (CommError, UsageError, timeouts)
        raise TrackingError(
            f"could not start a W&B {mode} run ({type(exc).__name__}: {one_line(exc)}); "
            f"run `wandb login`, or use --wandb offline"
        ) from None


def one_line(exc: Exception) -> str:
    """An exception's message on one line, at most 200 characters (W&B's errors run to many lines)."""
    return " ".join(str(exc).split())[:200]
