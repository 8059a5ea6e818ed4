"""Stop signals: SIGTERM (`kill`, schedulers, W&B's agent stopping a run) and SIGINT (Ctrl-C) end work cleanly.

`StopRequest` turns the first of them into a flag that training checks every batch (`lenet train`, W&B runs:
the run ends as `stopped` with its summary), or, with `raise_in_main=True`, also raises `StopSignal` in the
main thread at once (agents: waiting, claiming, starting W&B), except while training, where a raise could land
inside a C++ callback (torch.save's writer) and surface as another error: there the flag alone stops the run
at the next batch, and the agent requeues it."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def signal_name(signum: int) -> str:
    """SIGTERM, SIGINT, ..."""
    return signal.Signals(signum).name


class StopSignal(KeyboardInterrupt):
    """Raised in the main thread when a stop signal arrives."""

    # A KeyboardInterrupt, so `except Exception` (a run's failure) never swallows it and code that handles
    # Ctrl-C (W&B's agent) handles SIGTERM the same way.

    def __init__(self, signum: int) -> None:
        super().__init__(signal_name(signum))
        self.signum = signum


class StopRequest:
    """A stop flag that SIGTERM and SIGINT set while it is entered (`with`); call it to ask whether to stop."""

    # Handlers are installed only in the main thread (elsewhere Python cannot); `set()` sets the flag from code.
    # Only the first signal counts: later ones are ignored so that clean-up (requeue, summary) is not cut short.
    # The flag is a plain attribute, not a threading.Event: a handler that took the Event's lock could deadlock
    # the main thread it interrupted inside that lock.

    def __init__(self, raise_in_main: bool = False) -> None:
        self.raise_in_main = raise_in_main
        self.signum: int | None = None
        self._deferred = 0
        self._previous: dict[int, Any] = {}

    def __call__(self) -> bool:
        return self.signum is not None

    def set(self, signum: int = signal.SIGTERM) -> None:
        """Ask for a stop, as if `signum` had arrived (without raising)."""
        if self.signum is None:
            self.signum = signum

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """Inside, a signal only sets the flag (even with `raise_in_main`); the code polls it."""
        self._deferred += 1
        try:
            yield
        finally:
            self._deferred -= 1

    def _handle(self, signum: int, frame: Any) -> None:
        first = self.signum is None
        self.set(signum)
        if first and self.raise_in_main and not self._deferred:
            raise StopSignal(signum)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


def exit_by_signal(signum: int) -> None:
    """End this process by `signum` with its default action, as Python does for an uncaught KeyboardInterrupt."""
    # Shells then report 128 + signum (130, 143) and stop their loops, and W&B's agent does not count a run it
    # stopped as a failed one (it counts exit codes > 0).
    sys.stdout.flush()
    sys.stderr.flush()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    raise SystemExit(128 + signum)  # only reached where the signal is blocked
