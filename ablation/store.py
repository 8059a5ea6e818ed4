"""The embedded local sweep store: one SQLite file (WAL) holding sweeps, runs, heartbeats and histories.

Claims run inside `BEGIN IMMEDIATE`, so any number of worker processes can claim concurrently without
training a grid point twice or skipping one."""

from __future__ import annotations

import json
import math
import os
import secrets
import socket
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ablation.errors import StoreError, SweepError
from ablation.sweep import grid_size, suggest, sweep_run, to_stop

SCHEMA = """
CREATE TABLE IF NOT EXISTS sweeps (
    id TEXT PRIMARY KEY, name TEXT, backend TEXT NOT NULL, config TEXT NOT NULL, seed INTEGER NOT NULL,
    state TEXT NOT NULL, project TEXT, entity TEXT, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY, sweep_id TEXT NOT NULL REFERENCES sweeps(id), idx INTEGER NOT NULL,
    params TEXT NOT NULL, state TEXT NOT NULL, worker TEXT, pid INTEGER, host TEXT, attempts INTEGER NOT NULL,
    heartbeat_at REAL, created_at REAL NOT NULL, started_at REAL, ended_at REAL,
    summary TEXT, error TEXT, should_stop INTEGER NOT NULL DEFAULT 0, UNIQUE (sweep_id, idx));
CREATE TABLE IF NOT EXISTS history (
    run_id TEXT NOT NULL REFERENCES runs(id), epoch INTEGER NOT NULL, metrics TEXT NOT NULL,
    PRIMARY KEY (run_id, epoch));
"""
TERMINAL = ("finished", "failed", "diverged", "stopped", "stopped_early")
WAIT = "wait"  # claim() result: nothing to claim now, but runs in flight may still be requeued


def heartbeat_timeout() -> float:
    """Seconds without a heartbeat after which a running run counts as dead and is requeued."""
    return float(os.environ.get("LENET_HEARTBEAT_TIMEOUT", "120"))


def home() -> Path:
    """The project directory holding the store, checkpoints and offline W&B runs: $LENET_HOME or ./lenet-runs."""
    return Path(os.environ.get("LENET_HOME", "lenet-runs"))


@dataclass(frozen=True)
class Claim:
    """A run handed to one worker: its id, parameters and which attempt this is (2+ means resume)."""

    run_id: str
    sweep_id: str
    params: dict[str, Any]
    attempt: int


def _json(value: Any) -> str:
    """JSON that keeps NaN/inf out of the file (they become null)."""

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        return v

    return json.dumps(clean(value))


class Store:
    """A connection to the store file; open one per process."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path or home() / "lenet.db")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA busy_timeout=60000")
            self.db.executescript(SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise StoreError(
                f"the sweep store {self.path} is corrupt or not a lenet store ({exc}); "
                f"move it away (set LENET_HOME to start a new one) and restore from exported bundles"
            ) from None

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that takes the lock up front (no lost updates between workers)."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def create_sweep(
        self,
        config: dict[str, Any],
        backend: str = "local",
        sweep_id: str | None = None,
        seed: int | None = None,
        project: str | None = None,
        entity: str | None = None,
    ) -> str:
        """Record a validated sweep; returns its id (8 lowercase letters/digits, as W&B's)."""
        sweep_id = sweep_id or secrets.token_hex(4)
        seed = secrets.randbelow(2**31) if seed is None else seed
        with self.transaction() as db:
            db.execute(
                "INSERT INTO sweeps VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    sweep_id,
                    config.get("name"),
                    backend,
                    json.dumps(config),
                    seed,
                    "running",
                    project,
                    entity,
                    time.time(),
                ),
            )
        return sweep_id

    def sweep(self, sweep_id: str) -> dict[str, Any]:
        """One sweep's record; a clear error for an unknown id."""
        row = self.db.execute("SELECT * FROM sweeps WHERE id = ?", (sweep_id,)).fetchone()
        if row is None:
            known = [r["id"] for r in self.db.execute("SELECT id FROM sweeps ORDER BY created_at DESC LIMIT 5")]
            raise SweepError(
                f"unknown sweep id {sweep_id!r} in {self.path}; "
                + (f"recent sweeps: {', '.join(known)}" if known else "create one with `lenet sweep create FILE`")
            )
        return {**dict(row), "config": json.loads(row["config"])}

    def sweeps(self) -> list[dict[str, Any]]:
        """All sweeps, newest first."""
        return [self.sweep(r["id"]) for r in self.db.execute("SELECT id FROM sweeps ORDER BY created_at DESC")]

    def set_sweep_state(self, sweep_id: str, state: str) -> None:
        """Mark a sweep running, finished or stopped (stopped: workers claim nothing new)."""
        self.sweep(sweep_id)
        with self.transaction() as db:
            db.execute("UPDATE sweeps SET state = ? WHERE id = ?", (state, sweep_id))

    def runs(self, sweep_id: str) -> list[dict[str, Any]]:
        """A sweep's runs in creation order, with params and summary decoded."""
        rows = self.db.execute("SELECT * FROM runs WHERE sweep_id = ? ORDER BY idx", (sweep_id,)).fetchall()
        return [
            {
                **dict(r),
                "params": json.loads(r["params"]),
                "summary": json.loads(r["summary"]) if r["summary"] else None,
            }
            for r in rows
        ]

    def history(self, run_id: str) -> list[dict[str, Any]]:
        """Per-epoch metrics of one run, by epoch."""
        rows = self.db.execute("SELECT epoch, metrics FROM history WHERE run_id = ? ORDER BY epoch", (run_id,))
        return [{**json.loads(r["metrics"]), "epoch": r["epoch"]} for r in rows]

    def claim(self, sweep_id: str, worker: str) -> Claim | str | None:
        """The next run for `worker`: a requeued one, else a new one from the search; WAIT or None (done)."""
        with self.transaction() as db:
            sweep = self.sweep(sweep_id)
            if sweep["state"] != "running":
                return None
            self._requeue_stale(db, sweep_id)
            row = db.execute(
                "SELECT * FROM runs WHERE sweep_id = ? AND state = 'pending' ORDER BY idx LIMIT 1", (sweep_id,)
            ).fetchone()
            if row is None:
                row = self._new_run(db, sweep)
            if row is None:
                in_flight = db.execute(
                    "SELECT COUNT(*) FROM runs WHERE sweep_id = ? AND state = 'running'", (sweep_id,)
                ).fetchone()[0]
                if not in_flight:
                    db.execute("UPDATE sweeps SET state = 'finished' WHERE id = ?", (sweep_id,))
                return WAIT if in_flight else None
            now = time.time()
            db.execute(
                "UPDATE runs SET state = 'running', worker = ?, pid = ?, host = ?, attempts = attempts + 1, "
                "heartbeat_at = ?, started_at = COALESCE(started_at, ?), error = NULL WHERE id = ?",
                (worker, os.getpid(), socket.gethostname(), now, now, row["id"]),
            )
            return Claim(row["id"], sweep_id, json.loads(row["params"]), row["attempts"] + 1)

    def _requeue_stale(self, db: sqlite3.Connection, sweep_id: str) -> None:
        db.execute(
            "UPDATE runs SET state = 'pending', error = 'worker lost (no heartbeat); requeued' "
            "WHERE sweep_id = ? AND state = 'running' AND heartbeat_at < ?",
            (sweep_id, time.time() - heartbeat_timeout()),
        )

    def _new_run(self, db: sqlite3.Connection, sweep: dict[str, Any]) -> sqlite3.Row | None:
        """Ask W&B's search logic for the next point; insert it as pending. None: grid done or run_cap hit."""
        config, runs = sweep["config"], self.runs(sweep["id"])
        cap = config.get("run_cap") or grid_size(config)
        if cap is not None and len(runs) >= cap:
            return None
        params = suggest(config, self._engine_runs(runs), sweep["seed"])
        if params is None:
            return None
        idx = len(runs)
        run_id = f"{sweep['id']}-{idx:03d}"
        db.execute(
            "INSERT INTO runs (id, sweep_id, idx, params, state, attempts, created_at) VALUES (?,?,?,?,?,?,?)",
            (run_id, sweep["id"], idx, json.dumps(params), "pending", 0, time.time()),
        )
        return db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()

    def heartbeat(self, run_id: str) -> None:
        """Mark a run alive now."""
        self.db.execute("UPDATE runs SET heartbeat_at = ? WHERE id = ? AND state = 'running'", (time.time(), run_id))

    def log_epoch(self, run_id: str, epoch: int, metrics: dict[str, Any]) -> None:
        """Store one epoch's metrics (a resumed run overwrites the epochs it repeats)."""
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO history VALUES (?,?,?)", (run_id, epoch, _json(metrics)))
            db.execute("UPDATE runs SET heartbeat_at = ? WHERE id = ?", (time.time(), run_id))

    def finish(self, run_id: str, state: str, summary: dict[str, Any] | None = None, error: str | None = None) -> None:
        """Close a run as finished, failed, diverged, stopped (hyperband) or stopped_early."""
        with self.transaction() as db:
            db.execute(
                "UPDATE runs SET state = ?, summary = ?, error = ?, ended_at = ? WHERE id = ?",
                (state, _json(summary) if summary is not None else None, error, time.time(), run_id),
            )

    def requeue(self, run_id: str, reason: str) -> None:
        """Hand a run back (its worker was interrupted); the next claim resumes it from its checkpoint."""
        with self.transaction() as db:
            db.execute(
                "UPDATE runs SET state = 'pending', error = ? WHERE id = ? AND state = 'running'", (reason, run_id)
            )

    def retry_failed(self, sweep_id: str) -> int:
        """Requeue the sweep's failed and diverged runs; returns how many."""
        self.sweep(sweep_id)
        with self.transaction() as db:
            # attempts = 0: a retry trains from scratch (a diverged run's checkpoint holds NaN state)
            count = db.execute(
                "UPDATE runs SET state = 'pending', error = NULL, attempts = 0 WHERE sweep_id = ? "
                "AND state IN ('failed', 'diverged')",
                (sweep_id,),
            ).rowcount
            if count:
                db.execute("UPDATE sweeps SET state = 'running' WHERE id = ? AND state = 'finished'", (sweep_id,))
        return count

    def should_stop(self, run_id: str) -> bool:
        """True when hyperband early termination stops this run now (per W&B's `stop_runs`).
        A stopped sweep lets runs in progress finish, as W&B does."""
        row = self.db.execute("SELECT sweep_id FROM runs WHERE id = ?", (run_id,)).fetchone()
        sweep = self.sweep(row["sweep_id"])
        if not sweep["config"].get("early_terminate"):
            return False
        return run_id in to_stop(sweep["config"], self._engine_runs(self.runs(sweep["id"])))

    def _engine_runs(self, runs: list[dict[str, Any]]) -> list[Any]:
        """Our run records, with their histories, as the `sweeps` package's SweepRun objects."""
        return [sweep_run(r["id"], r["state"], r["params"], self.history(r["id"]), r["summary"]) for r in runs]
