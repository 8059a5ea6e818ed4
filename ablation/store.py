"""The embedded local sweep store: one SQLite file (WAL) holding sweeps, runs, heartbeats and histories.

Claims run inside `BEGIN IMMEDIATE`, so any number of worker processes can claim concurrently without
training a grid point twice or skipping one. The file carries a schema version (`PRAGMA user_version`); an
existing file is checked read-only (SQLite? intact? ours? not newer?) before anything is written to it."""

from __future__ import annotations

import importlib
import json
import math
import os
import secrets
import shutil
import socket
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from ablation.config import RunConfig
from ablation.errors import ConfigError, StoreError, StoreWriteError, SweepError
from ablation.sweep import grid_size, quiet, suggest, sweep_run, to_stop

# The schema's history, one step per version; a store at version N runs steps N+1.. when opened.
# (The first release wrote version 1's tables without setting user_version: 0 with those tables means 1.)
MIGRATIONS = (
    # 1: sweeps, runs, per-epoch history
    """
    CREATE TABLE sweeps (
        id TEXT PRIMARY KEY, name TEXT, backend TEXT NOT NULL, config TEXT NOT NULL, seed INTEGER NOT NULL,
        state TEXT NOT NULL, project TEXT, entity TEXT, created_at REAL NOT NULL);
    CREATE TABLE runs (
        id TEXT PRIMARY KEY, sweep_id TEXT NOT NULL REFERENCES sweeps(id), idx INTEGER NOT NULL,
        params TEXT NOT NULL, state TEXT NOT NULL, worker TEXT, pid INTEGER, host TEXT, attempts INTEGER NOT NULL,
        heartbeat_at REAL, created_at REAL NOT NULL, started_at REAL, ended_at REAL,
        summary TEXT, error TEXT, should_stop INTEGER NOT NULL DEFAULT 0, UNIQUE (sweep_id, idx));
    CREATE TABLE history (
        run_id TEXT NOT NULL REFERENCES runs(id), epoch INTEGER NOT NULL, metrics TEXT NOT NULL,
        PRIMARY KEY (run_id, epoch));
    """,
    # 2: each run's full resolved config (JSON), written when it is claimed, so editing a preset relabels nothing
    "ALTER TABLE runs ADD COLUMN config TEXT",
    # 3: the looks `sweep extend` took: seeds per level, alpha spent, comparisons open, runs added (target: the
    # seeds per level they bring the open comparisons to; NULL when none were added: the last look)
    """
    CREATE TABLE looks (
        sweep_id TEXT NOT NULL REFERENCES sweeps(id), look INTEGER NOT NULL, seeds INTEGER NOT NULL,
        target INTEGER, alpha REAL NOT NULL, equivalence REAL NOT NULL, comparisons INTEGER NOT NULL,
        inconclusive INTEGER NOT NULL, runs_added INTEGER NOT NULL, outcome TEXT NOT NULL,
        open_comparisons TEXT NOT NULL, created_at REAL NOT NULL, PRIMARY KEY (sweep_id, look));
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)
TERMINAL = ("finished", "failed", "diverged", "stopped", "stopped_early")
WAIT = "wait"  # claim() result: nothing to claim now, but runs in flight may still be requeued
FULL_BELOW = 1 << 20  # bytes free under which a failed write or open is put down to a full disk


def heartbeat_timeout() -> float:
    """Seconds without a heartbeat after which a running run counts as dead and is requeued."""
    return float(os.environ.get("LENET_HEARTBEAT_TIMEOUT", "120"))


def home() -> Path:
    """The project directory holding the store, checkpoints and offline W&B runs: $LENET_HOME or ./lenet-runs."""
    return Path(os.environ.get("LENET_HOME", "lenet-runs"))


@dataclass(frozen=True)
class Claim:
    """A run handed to one worker: its id, parameters, which attempt this is (2+ means resume) and its full
    config as stored (None when the parameters do not make a valid config: training then fails with why)."""

    run_id: str
    sweep_id: str
    params: dict[str, Any]
    attempt: int
    config: dict[str, Any] | None = None


def _json(value: Any) -> str:
    """JSON that keeps NaN/inf out of the file (they become null)."""

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        return v

    return json.dumps(clean(value))


def resolved_config(params: dict[str, Any], defaults: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Every RunConfig field of a run: its preset, then `defaults` (e.g. the worker's threads), then its params."""
    try:
        return RunConfig.from_dict({**(defaults or {}), **params}).to_dict()
    except ConfigError:
        return None  # training reports the bad setting as the run's error


# ---- What can go wrong with the file, in one line each (and never "damaged" unless it is) ----


def _free(folder: Path) -> int:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return -1


def _disk_full(folder: Path) -> bool:
    return 0 <= _free(folder) < FULL_BELOW


def _cannot_write(folder: Path) -> bool:
    """A full disk or a read-only folder: SQLite can read the store there, but not write (nor add its -shm file)."""
    return _disk_full(folder) or not os.access(folder, os.W_OK)


def damaged(path: Path, detail: str) -> StoreError:
    """The error for a store file that is really damaged."""
    return StoreError(
        f"the sweep store {path} is damaged (corrupt: {detail}); move it away and discard it (or set LENET_HOME "
        f"to start a new store), then re-create sweeps or restore results from exported bundles"
    )


def store_error(exc: sqlite3.Error, path: Path) -> StoreError:
    """SQLite's error as one line that names the cause (disk full, read-only, locked, damaged) and the fix;
    a full or read-only disk is a StoreWriteError (also an OutputError: the store is intact, not its fault)."""
    code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF  # the primary result code
    folder = path.parent
    what = f"{exc}" + (f", {exc.sqlite_errorname}" if getattr(exc, "sqlite_errorname", None) else "")
    if code == sqlite3.SQLITE_FULL or (code in (sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CANTOPEN) and _disk_full(folder)):
        return StoreWriteError(
            f"disk full: cannot write the sweep store {path} ({what}; {max(_free(folder), 0) // 1024} KiB free); "
            f"free space on that disk or set LENET_HOME to a folder on another disk, then retry (the store is intact)"
        )
    if code == sqlite3.SQLITE_READONLY or (
        code in (sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CANTOPEN) and _cannot_write(folder)
    ):
        return StoreWriteError(
            f"read-only: cannot write the sweep store {path} ({what}); make the file and {folder} writable, "
            f"or set LENET_HOME to a writable folder"
        )
    if code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
        return damaged(path, " ".join(str(exc).split()))
    if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return StoreError(f"the sweep store {path} is locked by another process ({what}); retry when that one is done")
    if code == sqlite3.SQLITE_CANTOPEN:
        return StoreError(f"cannot open the sweep store {path} ({what}); check that {folder} exists and is readable")
    if code == sqlite3.SQLITE_IOERR:
        return StoreError(f"disk I/O error on the sweep store {path} ({what}); check the disk (e.g. dmesg), then retry")
    return StoreError(f"the sweep store {path} failed ({what}); retry, or report it with the LENET_DEBUG=1 traceback")


@cache
def schema_tables(version: int) -> dict[str, tuple[str, ...]]:
    """Each table's columns at a schema version (MIGRATIONS applied to an empty database in memory)."""
    db = sqlite3.connect(":memory:")
    for step in MIGRATIONS[:version]:
        db.executescript(step)
    tables = _tables(db)
    db.close()
    return tables


def _tables(db: sqlite3.Connection) -> dict[str, tuple[str, ...]]:
    names = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
    return {
        n: tuple(r[0] for r in db.execute("SELECT name FROM pragma_table_info(?)", (n,)))
        for n in names
        if not n.startswith("sqlite_")
    }


def schema_version(db: sqlite3.Connection, path: Path) -> int:
    """The store's schema version (0: empty), or a StoreError for a database that is not a lenet store we know."""
    tables = _tables(db)
    version = db.execute("PRAGMA user_version").fetchone()[0] or (1 if tables else 0)  # 1st release: no version
    if version > SCHEMA_VERSION and set(schema_tables(1)) <= set(tables):
        raise StoreError(
            f"the sweep store {path} was made by a newer lenet (schema {version}; this one reads up to "
            f"{SCHEMA_VERSION}); upgrade lenet, or set LENET_HOME to another folder"
        )
    if version < 0 or version > SCHEMA_VERSION or tables != schema_tables(version):
        names = ", ".join(sorted(tables)[:8]) + (", ..." if len(tables) > 8 else "")
        raise StoreError(
            f"{path} is a SQLite database of another program (tables: {names or 'none'}), not a lenet sweep store; "
            f"set LENET_HOME to another folder (the file was not changed)"
        )
    return version


def check_file(path: Path) -> int:
    """Check an existing store file without writing to it; returns its schema version (0: no file yet, or empty)."""
    if path.is_dir():
        raise StoreError(f"the sweep store {path} is a folder, not a file; move it away or set LENET_HOME elsewhere")
    try:
        with open(path, "rb") as fh:
            header = fh.read(100)
    except FileNotFoundError:
        return 0
    except OSError as exc:
        raise StoreError(f"cannot read the sweep store {path} ({exc.strerror}); make it readable") from exc
    if not header:
        return 0  # an empty file is a new store
    if not header.startswith(b"SQLite format 3\x00"):
        raise StoreError(
            f"{path} is not a SQLite file, so not a lenet sweep store; move it away or set LENET_HOME to another "
            f"folder (the file was not changed)"
        )
    if not os.path.exists(f"{path}-wal"):
        # No -wal file: the store is this file alone, so read it as it stands (no locks, no -shm/-wal created
        # beside a foreign or damaged file); the answer counts if no other process wrote the file meanwhile.
        before = _stamp(path)
        try:
            version = _inspect(path, immutable=True)
        except StoreError:
            if _stamp(path) == before:
                raise
        else:
            if _stamp(path) == before:
                return version
    return _inspect(path, immutable=False)  # a live store (or a crashed one's -wal): read with SQLite's locking


def _stamp(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


def _inspect(path: Path, immutable: bool) -> int:
    """quick_check and the schema version, through a read-only connection."""
    try:
        db = _read_only(path, immutable)
        try:
            problems = [r[0] for r in db.execute("PRAGMA quick_check")]
            if problems != ["ok"]:
                raise damaged(path, " ".join(" ".join(problems[:3]).split()))
            return schema_version(db, path)
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise store_error(exc, path) from exc


def _read_only(path: Path, immutable: bool) -> sqlite3.Connection:
    """A connection that cannot write to the file (WAL readers still share the -wal/-shm files of a live store)."""
    uri = path.resolve().as_uri()
    if not immutable:
        try:
            return _opened(sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=60))
        except sqlite3.OperationalError:
            if not _cannot_write(path.parent):
                raise
    # (Also when a full or read-only disk cannot hold the -shm index that WAL readers need.)
    return _opened(sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True))


def _opened(db: sqlite3.Connection) -> sqlite3.Connection:
    """The connection, its file opened now (SQLite opens lazily, at the first statement)."""
    try:
        db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
    except BaseException:
        db.close()
        raise
    return db


def _switch_to_wal(db: sqlite3.Connection) -> None:
    """WAL mode for a new store. SQLite does not wait for a lock for this switch, so we do (for up to 60 s):
    several processes may create the store at once."""
    deadline = time.monotonic() + 60
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def make_folder(folder: Path) -> None:
    """Create the store's folder, or say in one line why it cannot be."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise StoreError(
            f"{folder} (or a folder above it) is a file, not a folder for the sweep store; set LENET_HOME to a folder"
        ) from None
    except OSError as exc:  # read-only, permission denied, disk full
        raise StoreWriteError(
            f"cannot create the store folder {folder} ({exc.strerror}); set LENET_HOME to a writable folder"
        ) from None


class Store:
    """A connection to the store file; open one per process (and `close` it, or use it in a `with`)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path or home() / "lenet.db")
        self.read_only: str | None = None  # why writes are refused (a full or read-only disk); None: they are not
        make_folder(self.path.parent)
        version = check_file(self.path)  # before anything is written: a foreign or damaged file stays untouched
        self.db = self._connect()
        if version < SCHEMA_VERSION and not self.read_only:
            self._migrate()

    def _connect(self) -> sqlite3.Connection:
        try:
            return self._open("shared")
        except sqlite3.OperationalError as exc:
            if not _cannot_write(self.path.parent):
                raise store_error(exc, self.path) from exc
            reason = str(store_error(exc, self.path))
        # Shared WAL access needs the -shm index, which a full or read-only disk cannot hold. Reading alone still
        # lists sweeps: locking_mode EXCLUSIVE keeps the index in memory (a full disk), or, on a read-only
        # filesystem where nothing can change the file, immutable. We copy the store into memory and let go of
        # the file at once (an exclusive lock would stall every other process); writes then fail with `reason`.
        try:
            db = self._open("exclusive")
        except sqlite3.OperationalError as exc:
            if _disk_full(self.path.parent):
                raise store_error(exc, self.path) from exc
            try:
                db = self._open("immutable")
            except sqlite3.Error as exc:
                raise store_error(exc, self.path) from exc
        copy = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        copy.row_factory = sqlite3.Row
        try:
            db.backup(copy)
        except sqlite3.Error as exc:
            raise store_error(exc, self.path) from exc
        finally:
            db.close()
        self.read_only = reason
        return copy

    def _open(self, mode: str) -> sqlite3.Connection:
        """A connection in `mode`: shared (normal), exclusive (no -shm file) or immutable (read-only media)."""
        target = f"{self.path.resolve().as_uri()}?mode=ro&immutable=1" if mode == "immutable" else self.path
        db = sqlite3.connect(target, timeout=60, isolation_level=None, check_same_thread=False, uri=True)
        try:
            db.row_factory = sqlite3.Row
            if mode == "exclusive":
                db.execute("PRAGMA locking_mode=EXCLUSIVE")
            if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":  # only a new store is switched (a write)
                _switch_to_wal(db)
            return _opened(db)
        except BaseException:
            db.close()
            raise

    def _migrate(self) -> None:
        """Bring the file to SCHEMA_VERSION step by step, in one write transaction (other processes wait)."""
        with self.transaction() as db:
            version = schema_version(db, self.path)  # again, under the lock: another process may have done it
            for step in range(version, SCHEMA_VERSION):
                for statement in MIGRATIONS[step].split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {step + 1}")

    def close(self) -> None:
        """Close the connection (the last one out folds the -wal file back into the store)."""
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that takes the lock up front (no lost updates between workers). Every write goes
        through here: SQLite's errors become one-line StoreErrors (disk full, read-only...) and roll it back."""
        if self.read_only:
            raise StoreWriteError(self.read_only)
        try:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
                self.db.execute("COMMIT")
            except BaseException:
                if self.db.in_transaction:  # SQLite may already have rolled back (a full disk, say)
                    self.db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise store_error(exc, self.path) from exc

    def _rows(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        """A read, with SQLite's errors as one-line StoreErrors."""
        try:
            return self.db.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise store_error(exc, self.path) from exc

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
        rows = self._rows("SELECT * FROM sweeps WHERE id = ?", (sweep_id,))
        if not rows:
            known = [r["id"] for r in self._rows("SELECT id FROM sweeps ORDER BY created_at DESC LIMIT 5")]
            raise SweepError(
                f"unknown sweep id {sweep_id!r} in {self.path}; "
                + (f"recent sweeps: {', '.join(known)}" if known else "create one with `lenet sweep create FILE`")
            )
        return {**dict(rows[0]), "config": json.loads(rows[0]["config"])}

    def sweeps(self) -> list[dict[str, Any]]:
        """All sweeps, newest first."""
        return [self.sweep(r["id"]) for r in self._rows("SELECT id FROM sweeps ORDER BY created_at DESC")]

    def set_sweep_state(self, sweep_id: str, state: str) -> None:
        """Mark a sweep running, finished or stopped (stopped: workers claim nothing new)."""
        self.sweep(sweep_id)
        with self.transaction() as db:
            db.execute("UPDATE sweeps SET state = ? WHERE id = ?", (state, sweep_id))

    def runs(self, sweep_id: str) -> list[dict[str, Any]]:
        """A sweep's runs in creation order, with params, config (None: claimed before configs were stored) and
        summary decoded."""
        return [
            {
                **dict(r),
                "params": json.loads(r["params"]),
                "config": _decoded(dict(r).get("config")),  # a store not yet migrated (read-only disk) has none
                "summary": _decoded(r["summary"]),
            }
            for r in self._rows("SELECT * FROM runs WHERE sweep_id = ? ORDER BY idx", (sweep_id,))
        ]

    def history(self, run_id: str) -> list[dict[str, Any]]:
        """Per-epoch metrics of one run, by epoch."""
        rows = self._rows("SELECT epoch, metrics FROM history WHERE run_id = ? ORDER BY epoch", (run_id,))
        return [{**json.loads(r["metrics"]), "epoch": r["epoch"]} for r in rows]

    def claim(self, sweep_id: str, worker: str, defaults: dict[str, Any] | None = None) -> Claim | str | None:
        """The next run for `worker`: a requeued one, else a new one from the search; WAIT or None (done).
        The run's full config (preset, then `defaults` such as the worker's threads, then its params) is stored
        now, so editing a preset later relabels nothing; a resumed run keeps the config it started with."""
        with quiet():  # W&B's search code takes seconds to import: not while holding every worker's write lock
            importlib.import_module(f"sweeps.{self.sweep(sweep_id)['config']['method']}_search")
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
            params = json.loads(row["params"])
            resumed = row["attempts"] > 0 and row["config"]  # retry_failed sets attempts 0: a fresh start
            config = json.loads(row["config"]) if resumed else resolved_config(params, defaults)
            now = time.time()
            db.execute(
                "UPDATE runs SET state = 'running', worker = ?, pid = ?, host = ?, attempts = attempts + 1, "
                "heartbeat_at = ?, started_at = COALESCE(started_at, ?), error = NULL, config = ? WHERE id = ?",
                (worker, os.getpid(), socket.gethostname(), now, now, _json(config) if config else None, row["id"]),
            )
            return Claim(row["id"], sweep_id, params, row["attempts"] + 1, config)

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

    def add_runs(
        self, sweep_id: str, params_list: list[dict[str, Any]], look: dict[str, Any] | None = None
    ) -> list[str]:
        """Add pending runs to a sweep and record the `sweep extend` look that chose them, in one transaction; the
        sweep runs again. Refused (SweepError) while runs are pending or running, or when another process recorded
        this look first. Returns the new run ids."""
        self.sweep(sweep_id)
        with self.transaction() as db:
            busy = db.execute(
                "SELECT COUNT(*) FROM runs WHERE sweep_id = ? AND state IN ('pending', 'running')", (sweep_id,)
            ).fetchone()[0]
            if busy:
                raise SweepError(
                    f"sweep {sweep_id} has {busy} run(s) pending or running; let `lenet agent {sweep_id}` finish them "
                    "first (nothing was added)"
                )
            if look is not None:
                taken = db.execute("SELECT COUNT(*) FROM looks WHERE sweep_id = ?", (sweep_id,)).fetchone()[0]
                if look["look"] != taken + 1:
                    raise SweepError(
                        f"sweep {sweep_id} has {taken} look(s) recorded, so this is not look {look['look']} (another "
                        "`sweep extend` took it meanwhile?); run `lenet sweep status` and extend again"
                    )
                db.execute(
                    "INSERT INTO looks VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        sweep_id,
                        look["look"],
                        look["seeds"],
                        look.get("target"),
                        look["alpha"],
                        look["equivalence"],
                        look["comparisons"],
                        look["inconclusive"],
                        len(params_list),
                        look["outcome"],
                        _json(look.get("open_comparisons", [])),
                        time.time(),
                    ),
                )
            first = db.execute("SELECT COALESCE(MAX(idx), -1) + 1 FROM runs WHERE sweep_id = ?", (sweep_id,)).fetchone()
            ids = [f"{sweep_id}-{idx:03d}" for idx in range(first[0], first[0] + len(params_list))]
            now = time.time()
            db.executemany(
                "INSERT INTO runs (id, sweep_id, idx, params, state, attempts, created_at) VALUES (?,?,?,?,?,?,?)",
                [
                    (run_id, sweep_id, first[0] + i, json.dumps(params), "pending", 0, now)
                    for i, (run_id, params) in enumerate(zip(ids, params_list))
                ],
            )
            if ids:  # a finished (or stopped) sweep serves its new runs; _new_run adds no grid point past its size
                db.execute("UPDATE sweeps SET state = 'running' WHERE id = ?", (sweep_id,))
        return ids

    def looks(self, sweep_id: str) -> list[dict[str, Any]]:
        """The looks `sweep extend` took on a sweep, first to last (none in a store too old to have the table)."""
        if not self._rows("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'looks'"):
            return []  # a store opened read-only before its migration
        rows = self._rows("SELECT * FROM looks WHERE sweep_id = ? ORDER BY look", (sweep_id,))
        return [{**dict(r), "open_comparisons": json.loads(r["open_comparisons"])} for r in rows]

    def heartbeat(self, run_id: str) -> bool:
        """Mark a run alive now. False when the store cannot be written just now (a full disk): the run's next
        `log_epoch` raises why, and a run whose heartbeats stop for good is requeued by the next claim."""
        try:
            with self.transaction() as db:
                db.execute("UPDATE runs SET heartbeat_at = ? WHERE id = ? AND state = 'running'", (time.time(), run_id))
        except StoreError:
            return False
        return True

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
        sweep = self.sweep(self._rows("SELECT sweep_id FROM runs WHERE id = ?", (run_id,))[0]["sweep_id"])
        if not sweep["config"].get("early_terminate"):
            return False
        return run_id in to_stop(sweep["config"], self._engine_runs(self.runs(sweep["id"])))

    def _engine_runs(self, runs: list[dict[str, Any]]) -> list[Any]:
        """Our run records, with their histories, as the `sweeps` package's SweepRun objects."""
        return [sweep_run(r["id"], r["state"], r["params"], self.history(r["id"]), r["summary"]) for r in runs]


def _decoded(text: str | None) -> Any:
    return json.loads(text) if text else None
