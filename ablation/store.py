"""The local sweep store: sweeps, runs, heartbeats and histories, in one SQLite file (WAL) or a PostgreSQL database.

`LENET_STORE` picks it: a path or `sqlite:///abs/path.db` (default `$LENET_HOME/lenet.db`), or a libpq URL
(`postgresql://user@host/db`, `postgresql:///db?host=/socket/dir`) for several hosts. Claims run inside one
write lock (SQLite: `BEGIN IMMEDIATE`; PostgreSQL: a transaction-scoped advisory lock), so any number of worker
processes can claim concurrently without training a grid point twice or skipping one. A SQLite file carries a
schema version (`PRAGMA user_version`) and is checked read-only (SQLite? intact? ours? not newer?) before
anything is written to it; a PostgreSQL database keeps its version in the `meta` table."""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import secrets
import shutil
import socket
import sqlite3
import time
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from ablation.config import RunConfig
from ablation.errors import ConfigError, StoreError, StoreWriteError, SweepError
from ablation.states import DIVERGED, FAILED, FINISHED, PENDING, RUNNING
from ablation.sweep import (
    closest_band,
    grid_size,
    hyperband,
    hyperband_stops,
    is_number,
    quiet,
    suggest,
    suggest_grid,
    sweep_run,
)

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
    # 4: what claims and hyperband checks read, indexed, so neither reloads every history: runs by state, and
    # `rungs`, each run's valid values of its sweep's metric in order (pos 1, 2, ...; hyperband compares runs at
    # positions), filled from the histories already stored
    """
    CREATE INDEX runs_by_state ON runs (sweep_id, state, idx);
    CREATE TABLE rungs (
        sweep_id TEXT NOT NULL, run_id TEXT NOT NULL REFERENCES runs(id), epoch INTEGER NOT NULL,
        pos INTEGER NOT NULL, value REAL NOT NULL, PRIMARY KEY (run_id, epoch));
    CREATE INDEX rungs_by_pos ON rungs (sweep_id, pos, value);
    INSERT INTO rungs (sweep_id, run_id, epoch, pos, value)
        SELECT sweep_id, run_id, epoch, ROW_NUMBER() OVER (PARTITION BY run_id ORDER BY epoch), value FROM (
            SELECT r.sweep_id, h.run_id, h.epoch,
                json_extract(h.metrics, '$."' || json_extract(s.config, '$.metric.name') || '"') AS value
            FROM history h JOIN runs r ON r.id = h.run_id JOIN sweeps s ON s.id = r.sweep_id)
        WHERE typeof(value) IN ('real', 'integer');
    """,
    # 5: checkpoints kept in the store (a PostgreSQL store mirrors each run's best.pt and last.pt here, so a run
    # resumes on another host and `lenet test RUN_ID` finds its weights); one row per run and file name
    """
    CREATE TABLE checkpoints (
        run_id TEXT NOT NULL REFERENCES runs(id), name TEXT NOT NULL, epoch INTEGER NOT NULL, data BLOB NOT NULL,
        saved_at REAL NOT NULL, PRIMARY KEY (run_id, name));
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)
# The same schema (version SCHEMA_VERSION) for PostgreSQL, created in one step: the same tables and columns in the
# same order (the statements are shared), in PostgreSQL's types (REAL is float4 there); its version in `meta`.
PG_SCHEMA = """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE sweeps (
        id TEXT PRIMARY KEY, name TEXT, backend TEXT NOT NULL, config TEXT NOT NULL, seed BIGINT NOT NULL,
        state TEXT NOT NULL, project TEXT, entity TEXT, created_at DOUBLE PRECISION NOT NULL);
    CREATE TABLE runs (
        id TEXT PRIMARY KEY, sweep_id TEXT NOT NULL REFERENCES sweeps(id), idx INTEGER NOT NULL,
        params TEXT NOT NULL, state TEXT NOT NULL, worker TEXT, pid BIGINT, host TEXT, attempts INTEGER NOT NULL,
        heartbeat_at DOUBLE PRECISION, created_at DOUBLE PRECISION NOT NULL, started_at DOUBLE PRECISION,
        ended_at DOUBLE PRECISION, summary TEXT, error TEXT, should_stop INTEGER NOT NULL DEFAULT 0, config TEXT,
        UNIQUE (sweep_id, idx));
    CREATE TABLE history (
        run_id TEXT NOT NULL REFERENCES runs(id), epoch INTEGER NOT NULL, metrics TEXT NOT NULL,
        PRIMARY KEY (run_id, epoch));
    CREATE TABLE looks (
        sweep_id TEXT NOT NULL REFERENCES sweeps(id), look INTEGER NOT NULL, seeds INTEGER NOT NULL,
        target INTEGER, alpha DOUBLE PRECISION NOT NULL, equivalence DOUBLE PRECISION NOT NULL,
        comparisons INTEGER NOT NULL, inconclusive INTEGER NOT NULL, runs_added INTEGER NOT NULL,
        outcome TEXT NOT NULL, open_comparisons TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (sweep_id, look));
    CREATE INDEX runs_by_state ON runs (sweep_id, state, idx);
    CREATE TABLE rungs (
        sweep_id TEXT NOT NULL, run_id TEXT NOT NULL REFERENCES runs(id), epoch INTEGER NOT NULL,
        pos INTEGER NOT NULL, value DOUBLE PRECISION NOT NULL, PRIMARY KEY (run_id, epoch));
    CREATE INDEX rungs_by_pos ON rungs (sweep_id, pos, value);
    CREATE TABLE checkpoints (
        run_id TEXT NOT NULL REFERENCES runs(id), name TEXT NOT NULL, epoch INTEGER NOT NULL, data BYTEA NOT NULL,
        saved_at DOUBLE PRECISION NOT NULL, PRIMARY KEY (run_id, name));
"""
# PostgreSQL's steps from each version it has had to the next (version 4 was its first).
PG_MIGRATIONS = {
    4: """
    CREATE TABLE checkpoints (
        run_id TEXT NOT NULL REFERENCES runs(id), name TEXT NOT NULL, epoch INTEGER NOT NULL, data BYTEA NOT NULL,
        saved_at DOUBLE PRECISION NOT NULL, PRIMARY KEY (run_id, name));
    """,
}
PG_LOCK = 0x6C656E6574  # the advisory lock every write transaction on a PostgreSQL store takes ("lenet")
WAIT = "wait"  # claim() result: nothing to claim now, but runs in flight may still be requeued
PAGE = 64  # pending runs a claim reads at a time
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


def candidate(row: sqlite3.Row, sweep_id: str, defaults: dict[str, Any] | None) -> Claim:
    """The claim a pending run's row would become: a resumed run keeps the config it started with."""
    params = json.loads(row["params"])
    resumed = row["attempts"] > 0 and row["config"]  # retry_failed sets attempts 0: a fresh start
    config = json.loads(row["config"]) if resumed else resolved_config(params, defaults)
    return Claim(row["id"], sweep_id, params, row["attempts"] + 1, config)


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


UNLOCKED_READS = 4  # reads of a store without locks that must all fail before a failure counts (see check_file)
HEADERS: dict[tuple[int, int], int] = {}  # (device, inode) -> a descriptor kept open to read the store's header


def read_header(path: Path) -> bytes:
    """The first 100 bytes of the file (SQLite's header), read through a descriptor this process never closes:
    closing any descriptor of a file drops the POSIX locks this process's SQLite connections hold on it, after
    which another process could fold the WAL away under them ("file is not a database")."""
    st = os.stat(path)
    fd = HEADERS.get((st.st_dev, st.st_ino))
    if fd is None:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        st = os.fstat(fd)  # the file opened (replaced since the stat? then this one; a duplicate stays open)
        HEADERS.setdefault((st.st_dev, st.st_ino), fd)
    return os.pread(fd, 100, 0)


def check_file(path: Path) -> int:
    """Check an existing store file without writing to it; returns its schema version (0: no file yet, or empty)."""
    if path.is_dir():
        raise StoreError(f"the sweep store {path} is a folder, not a file; move it away or set LENET_HOME elsewhere")
    try:
        header = read_header(path)
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
    quiet_failures = 0  # failed reads while the file did not change and no rollback journal stood beside it
    for _ in range(UNLOCKED_READS):
        if os.path.exists(f"{path}-wal"):
            break
        # No -wal file: the store is this file alone, so read it as it stands (no locks, no -shm/-wal created
        # beside a foreign or damaged file); the answer counts if no other process wrote the file meanwhile. A
        # write within one tick of the kernel's coarse mtime clock (~4 ms) leaves the stamp as it was (another
        # process folding its migration back from the WAL can be caught half-way), so a failure is believed only
        # when every read fails.
        before = _stamp(path)
        try:
            version = _inspect(path, immutable=True)
        except StoreError:
            quiet_failures += _stamp(path) == before and not os.path.exists(f"{path}-journal")
            if quiet_failures == UNLOCKED_READS:
                raise
            time.sleep(0.05)  # s: past a concurrent migration's writes
            continue
        if _stamp(path) == before:
            return version
        break
    return _inspect(path, immutable=False)  # a live store (or a crashed one's -wal): read with SQLite's locking


def _stamp(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


def _inspect(path: Path, immutable: bool) -> int:
    """quick_check and the schema version, through a read-only connection."""
    try:
        db = _read_only(path, immutable)
        try:
            db.execute("BEGIN")  # one snapshot: tables and user_version of one state, not either side of a migration
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


# ---- The store as a URL, and PostgreSQL ----

URL_FORMS = "a path, sqlite:///abs/path.db, postgresql://user@host/db or postgresql:///db?host=/socket/dir"


def store_location(where: Path | str | None = None) -> Path | str:
    """Where the store is: a Path (a SQLite file) or a PostgreSQL URL; default $LENET_STORE, else
    $LENET_HOME/lenet.db. A Path is always a file; a string may be a path or a URL."""
    if where is None:
        where = os.environ.get("LENET_STORE") or home() / "lenet.db"
    if isinstance(where, Path):
        return where
    url = re.match(r"([A-Za-z][A-Za-z0-9+.-]*):(//)?", where)  # a scheme (a path has none, bar a typo's)
    if not url or (not url[2] and url[1] not in ("sqlite", "postgresql", "postgres")):
        return Path(where)
    scheme, rest = url[1], where[url.end() :]
    if not url[2]:
        raise StoreError(f"bad store URL {shown(where)!r}: no // after {scheme}:; use {URL_FORMS}")
    if scheme == "sqlite":
        if not rest.startswith("/") or rest == "/":
            raise StoreError(
                f"bad store URL {where!r}: a SQLite URL names an absolute file, as sqlite:///abs/path.db (three "
                f"slashes); fix LENET_STORE or --store"
            )
        return Path(rest)
    if scheme in ("postgresql", "postgres"):
        try:
            from psycopg.conninfo import conninfo_to_dict
        except ImportError:
            raise StoreError(
                f"the store {shown(where)} is a PostgreSQL database, which needs psycopg 3: pip install "
                f"'psycopg[binary]' (or point LENET_STORE at a SQLite file)"
            ) from None
        try:
            conninfo_to_dict(where)
        except Exception as exc:  # psycopg.ProgrammingError: libpq cannot parse it
            raise StoreError(f"bad store URL {shown(where)!r} ({one_line(exc)}); use {URL_FORMS}") from None
        return where
    raise StoreError(f"bad store URL {shown(where)!r}: unknown scheme {scheme!r}; use {URL_FORMS}")


def runs_home(location: Path | str) -> Path:
    """The folder for a store's checkpoints and offline W&B runs: beside a SQLite file, else $LENET_HOME."""
    return location.parent if isinstance(location, Path) else home()


def shown(url: str) -> str:
    """A URL fit to print: its password hidden."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        if parts.password:
            return url.replace(f":{parts.password}@", ":***@", 1)
    except ValueError:
        pass
    return url


def one_line(exc: BaseException) -> str:
    """An error's message on one line."""
    return " ".join(str(exc).split())


def pg_error(exc: Exception, url: str) -> StoreError:
    """psycopg's error as one line that names the cause and the fix."""
    import psycopg

    what = one_line(exc)
    if isinstance(exc, psycopg.OperationalError) and ("connect" in what or "server" in what):
        hint = "is the server running? check the URL (LENET_STORE or --store)"
        if "does not exist" in what:
            hint = "create it (createdb NAME), or check the URL (LENET_STORE or --store)"
        elif "authentication" in what or "password" in what:
            hint = "check the user and password in the URL (LENET_STORE or --store), or the server's pg_hba.conf"
        elif "refused" in what or "No such file" in what:
            what = f"connection refused: {what}"
        return StoreError(f"cannot reach the PostgreSQL store {shown(url)} ({what}); {hint}")
    return StoreError(f"the PostgreSQL store {shown(url)} failed ({what}); retry, or report it with LENET_DEBUG=1")


class PgRow(tuple):
    """A PostgreSQL row readable by index and by column name, and by dict(), as sqlite3.Row."""

    columns: dict[str, int]

    def __getitem__(self, key: Any) -> Any:
        return tuple.__getitem__(self, self.columns[key] if isinstance(key, str) else key)

    def keys(self) -> list[str]:
        """The column names, as sqlite3.Row.keys()."""
        return list(self.columns)


def pg_rows(cursor: Any) -> Callable[[Any], PgRow]:
    """psycopg's row factory for PgRow."""
    columns = {c.name: i for i, c in enumerate(cursor.description or [])}

    def make(values: Any) -> PgRow:
        row = PgRow(values)
        row.columns = columns
        return row

    return make


class PgConnection:
    """A psycopg connection (autocommit: transactions are explicit) that takes the store's SQL as written for
    SQLite (`?` placeholders), so both backends share one set of statements."""

    def __init__(self, url: str) -> None:
        import psycopg

        self.conn = psycopg.connect(url, autocommit=True, row_factory=pg_rows, connect_timeout=30)

    def execute(self, sql: str, args: Any = ()) -> Any:
        """Run one statement with `?` placeholders; its cursor."""
        return self.conn.execute(pg_sql(sql), args or None)

    def executemany(self, sql: str, rows: Any) -> Any:
        """Run one statement for each parameter row; the cursor."""
        cursor = self.conn.cursor()
        cursor.executemany(pg_sql(sql), rows)
        return cursor

    @property
    def in_transaction(self) -> bool:
        """Whether a transaction is open, as sqlite3.Connection.in_transaction."""
        import psycopg

        return self.conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE

    def close(self) -> None:
        """Close the server connection."""
        self.conn.close()


def pg_sql(sql: str) -> str:
    """A statement with SQLite's `?` placeholders in psycopg's `%s` style (a literal % doubled)."""
    return sql.replace("%", "%%").replace("?", "%s")


class Store:
    """A connection to the store (a SQLite file or a PostgreSQL database); open one per process (and `close` it,
    or use it in a `with`). `location` (a Path or a PostgreSQL URL) opens the same store again."""

    def __init__(self, path: Path | str | None = None, create: bool = True) -> None:
        """Open the store at `path` (default: `store_location()`); create=False refuses to start a new SQLite file
        (commands that only read or change existing sweeps)."""
        self.location = store_location(path)
        self.read_only: str | None = None  # why writes are refused (a full or read-only disk); None: they are not
        self.metrics: dict[str, tuple[str, str | None]] = {}  # run id -> (sweep id, sweep metric name)
        if isinstance(self.location, str):
            self._open_postgres(self.location)
            return
        self.postgres = False
        self.errors: tuple[type[Exception], ...] = (sqlite3.Error,)
        self.path = self.location
        if not create and not self.path.exists():
            if any(p.exists() and not p.is_dir() for p in self.path.parents):
                make_folder(self.path.parent)  # raises: names the file that stands where a folder should
            raise StoreError(
                f"no sweep store at {self.path}: no sweep was created there; create one with `lenet sweep create "
                "FILE`, or point LENET_HOME (or --store / LENET_STORE) at the store you used"
            )
        make_folder(self.path.parent)
        version = check_file(self.path)  # before anything is written: a foreign or damaged file stays untouched
        self.db = self._connect()
        if version < SCHEMA_VERSION and not self.read_only:
            self._migrate()

    def _open_postgres(self, url: str) -> None:
        """Connect, and create the schema in a new (empty) database; a database of another program, or of a
        newer lenet, is refused untouched. (The SQLite-only checks and fallbacks do not apply.)"""
        import psycopg

        self.postgres = True
        self.errors = (sqlite3.Error, psycopg.Error)
        self.path = shown(url)  # what messages name
        try:
            self.db: Any = PgConnection(url)
        except psycopg.Error as exc:
            raise pg_error(exc, url) from None
        try:
            self._pg_schema()
        except BaseException:  # a database not ours, or newer: the refusal leaves no connection open
            self.db.close()
            raise

    def _pg_schema(self) -> None:
        """Create or migrate a PostgreSQL store's schema (one process at a time, under the store's lock)."""
        if self._pg_snapshot_version() < SCHEMA_VERSION:
            with self.transaction() as db:
                version = self._pg_version()  # again, under the lock: another process may have done it
                steps = [PG_SCHEMA] if version == 0 else [PG_MIGRATIONS[v] for v in range(version, SCHEMA_VERSION)]
                for step in steps:
                    for statement in step.split(";"):
                        if statement.strip():
                            db.execute(statement)
                if version == 0:
                    db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                else:
                    db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))

    def _pg_snapshot_version(self) -> int:
        """_pg_version from one snapshot (its tables and meta row of one state, not either side of a migration)."""
        try:
            self.db.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        except self.errors as exc:
            raise self._failed(exc) from exc
        try:
            return self._pg_version()
        finally:
            with suppress(*self.errors):  # a broken connection: the error that broke it is the one to report
                self.db.execute("ROLLBACK")

    def _pg_version(self) -> int:
        """A PostgreSQL store's schema version (0: an empty database), or a StoreError for one not ours or newer."""
        tables = [r[0] for r in self._rows("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")]
        if not tables:
            return 0
        version = 0
        if "meta" in tables:
            rows = self._rows("SELECT value FROM meta WHERE key = 'schema_version'")
            version = int(rows[0][0]) if rows and rows[0][0].isdigit() else 0
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"the sweep store {self.path} was made by a newer lenet (schema {version}; this one reads up to "
                f"{SCHEMA_VERSION}); upgrade lenet, or point LENET_STORE at another database"
            )
        if 0 < version < SCHEMA_VERSION and any(v not in PG_MIGRATIONS for v in range(version, SCHEMA_VERSION)):
            raise StoreError(
                f"PostgreSQL store: migrating {self.path} from schema {version} to {SCHEMA_VERSION} is not supported; "
                f"export its sweeps (`lenet sweep export`) and point LENET_STORE at a new, empty database"
            )
        if version == 0 or set(tables) != set(schema_tables(version)) | {"meta"}:
            names = ", ".join(sorted(tables)[:8]) + (", ..." if len(tables) > 8 else "")
            raise StoreError(
                f"{self.path} is a PostgreSQL database of another program (tables: {names}), not a lenet sweep "
                f"store; point LENET_STORE at a new, empty database (nothing was changed)"
            )
        return version

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
    def transaction(self) -> Iterator[Any]:
        """A write transaction that takes the lock up front (no lost updates between workers; on PostgreSQL one
        advisory lock serialises writes as SQLite's does). Every write goes through here: the database's errors
        become one-line StoreErrors (disk full, read-only...) and roll it back."""
        if self.read_only:
            raise StoreWriteError(self.read_only)
        try:
            self.db.execute("BEGIN" if self.postgres else "BEGIN IMMEDIATE")
            try:
                if self.postgres:
                    self.db.execute(f"SELECT pg_advisory_xact_lock({PG_LOCK})")
                yield self.db
                self.db.execute("COMMIT")
            except BaseException:
                if self.db.in_transaction:  # SQLite may already have rolled back (a full disk, say)
                    self.db.execute("ROLLBACK")
                raise
        except self.errors as exc:
            raise self._failed(exc) from exc

    def _failed(self, exc: Exception) -> StoreError:
        """The database's error as a one-line StoreError."""
        if isinstance(exc, sqlite3.Error):
            return store_error(exc, self.path)
        return pg_error(exc, str(self.location))

    def _rows(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        """A read, with the database's errors as one-line StoreErrors."""
        try:
            return self.db.execute(sql, args).fetchall()
        except self.errors as exc:
            raise self._failed(exc) from exc

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
                    RUNNING,
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
        claims = self.claim_many(sweep_id, worker, 1, defaults)
        return claims[0] if isinstance(claims, list) else claims

    def claim_many(
        self,
        sweep_id: str,
        worker: str,
        limit: int,
        defaults: dict[str, Any] | None = None,
        key: Callable[[Claim], Hashable | None] | None = None,
    ) -> list[Claim] | str | None:
        """Up to `limit` runs for `worker` in one transaction (as `claim`), all with the first one's `key` (a first
        run whose key is None is claimed alone, without looking further): requeued runs first, in order, then new
        ones from the search (a new run that does not fit stays pending for the next claim; a search draws at most
        `limit` points, a grid inserts its remaining points at once). WAIT or None (done) when there is none."""
        with quiet():  # W&B's search code takes seconds to import: not while holding every worker's write lock
            importlib.import_module(f"sweeps.{self.sweep(sweep_id)['config']['method']}_search")
        with self.transaction() as db:
            sweep = self.sweep(sweep_id)
            if sweep["state"] != RUNNING:
                return None
            self._requeue_stale(db, sweep_id)
            claims: list[Claim] = []
            wanted: list[Hashable] = []  # the first claim's key

            def full() -> bool:  # a first claim whose key is None takes no partners
                return len(claims) >= (1 if wanted and wanted[0] is None else limit)

            def offer(row: sqlite3.Row) -> None:
                claim = candidate(row, sweep_id, defaults)
                mine = key(claim) if key else ()
                if not claims or (mine is not None and mine == wanted[0]):
                    claims.append(claim)
                    wanted[:] = [mine]

            after = -1  # pending rows up to this idx were offered
            for _ in range(limit + 1):  # at most `limit` asks of the search for new runs
                while not full():  # read no further than needed: pages of PAGE rows (a database
                    rows = db.execute(  # server would send a whole result at once)
                        f"SELECT * FROM runs WHERE sweep_id = ? AND state = '{PENDING}' AND idx > ? "
                        "ORDER BY idx LIMIT ?",
                        (sweep_id, after, PAGE),
                    ).fetchall()
                    for row in rows:
                        if full():
                            break
                        after = row["idx"]
                        offer(row)
                    if len(rows) < PAGE:
                        break
                if full() or self._new_run(db, sweep) is None:
                    break
            if not claims:
                in_flight = db.execute(
                    f"SELECT COUNT(*) FROM runs WHERE sweep_id = ? AND state = '{RUNNING}'", (sweep_id,)
                ).fetchone()[0]
                if not in_flight:
                    db.execute(f"UPDATE sweeps SET state = '{FINISHED}' WHERE id = ?", (sweep_id,))
                return WAIT if in_flight else None
            now, pid, host = time.time(), os.getpid(), socket.gethostname()
            db.executemany(
                f"UPDATE runs SET state = '{RUNNING}', worker = ?, pid = ?, host = ?, attempts = attempts + 1, "
                "heartbeat_at = ?, started_at = COALESCE(started_at, ?), error = NULL, config = ? WHERE id = ?",
                [(worker, pid, host, now, now, _json(c.config) if c.config else None, c.run_id) for c in claims],
            )
            return claims

    def _requeue_stale(self, db: sqlite3.Connection, sweep_id: str) -> None:
        # A worker whose heartbeat stopped is lost with every run it held: a pack's members, beaten one after
        # another, go stale milliseconds apart, and requeueing them at once lets them resume as one pack.
        db.execute(
            f"UPDATE runs SET state = '{PENDING}', error = 'worker lost (no heartbeat); requeued' "
            f"WHERE sweep_id = ? AND state = '{RUNNING}' AND worker IN (SELECT worker FROM runs "
            f"WHERE sweep_id = ? AND state = '{RUNNING}' AND heartbeat_at < ?)",
            (sweep_id, sweep_id, time.time() - heartbeat_timeout()),
        )

    def _new_run(self, db: sqlite3.Connection, sweep: dict[str, Any]) -> sqlite3.Row | None:
        """Ask W&B's search logic for the next point; insert it as pending. None: grid done or run_cap hit.
        A grid's remaining points are all inserted at once (pending, in the engine's order), so later claims
        only take the next pending row."""
        config = sweep["config"]
        count = db.execute("SELECT COUNT(*) FROM runs WHERE sweep_id = ?", (sweep["id"],)).fetchone()[0]
        cap = config.get("run_cap") or grid_size(config)
        if cap is not None and count >= cap:
            return None
        if config["method"] == "grid":
            points = suggest_grid(config, self._engine_runs(sweep["id"], histories=False), cap - count)
        else:  # random draws read no runs; bayes reads each run's metric values
            runs = self._engine_runs(sweep["id"], histories=True) if config["method"] == "bayes" else []
            point = suggest(config, runs, sweep["seed"], count)
            points = [] if point is None else [point]
        if not points:
            return None
        now = time.time()
        db.executemany(
            "INSERT INTO runs (id, sweep_id, idx, params, state, attempts, created_at) VALUES (?,?,?,?,?,?,?)",
            [
                (f"{sweep['id']}-{count + i:03d}", sweep["id"], count + i, json.dumps(p), PENDING, 0, now)
                for i, p in enumerate(points)
            ],
        )
        return db.execute("SELECT * FROM runs WHERE id = ?", (f"{sweep['id']}-{count:03d}",)).fetchone()

    def add_runs(
        self, sweep_id: str, params_list: list[dict[str, Any]], look: dict[str, Any] | None = None
    ) -> list[str]:
        """Add pending runs to a sweep and record the `sweep extend` look that chose them, in one transaction; the
        sweep runs again. Refused (SweepError) while runs are pending or running, or when another process recorded
        this look first. Returns the new run ids."""
        self.sweep(sweep_id)
        with self.transaction() as db:
            busy = db.execute(
                f"SELECT COUNT(*) FROM runs WHERE sweep_id = ? AND state IN ('{PENDING}', '{RUNNING}')", (sweep_id,)
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
                    (run_id, sweep_id, first[0] + i, json.dumps(params), PENDING, 0, now)
                    for i, (run_id, params) in enumerate(zip(ids, params_list))
                ],
            )
            if ids:  # a finished (or stopped) sweep serves its new runs; _new_run adds no grid point past its size
                db.execute(f"UPDATE sweeps SET state = '{RUNNING}' WHERE id = ?", (sweep_id,))
        return ids

    def looks(self, sweep_id: str) -> list[dict[str, Any]]:
        """The looks `sweep extend` took on a sweep, first to last (none in a store too old to have the table)."""
        if not self.postgres and not self._rows("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'looks'"):
            return []  # a store opened read-only before its migration
        rows = self._rows("SELECT * FROM looks WHERE sweep_id = ? ORDER BY look", (sweep_id,))
        return [{**dict(r), "open_comparisons": json.loads(r["open_comparisons"])} for r in rows]

    def heartbeat(self, *run_ids: str) -> bool:
        """Mark runs alive now, in one write. False when the store cannot be written just now (a full disk): the
        runs' next `log_epoch` raises why, and runs whose heartbeats stop for good are requeued by the next claim."""
        now = time.time()
        try:
            with self.transaction() as db:
                db.executemany(
                    f"UPDATE runs SET heartbeat_at = ? WHERE id = ? AND state = '{RUNNING}'",
                    [(now, i) for i in run_ids],
                )
        except StoreError:
            return False
        return True

    def log_epoch(self, run_id: str, epoch: int, metrics: dict[str, Any]) -> None:
        """Store one epoch's metrics (a resumed run overwrites the epochs it repeats), and its rung: the sweep
        metric's value if it is a finite number."""
        sweep_id, metric = self._metric_of(run_id)
        value = metrics.get(metric) if metric else None
        with self.transaction() as db:
            db.execute(
                "INSERT INTO history VALUES (?,?,?) "
                "ON CONFLICT (run_id, epoch) DO UPDATE SET metrics = excluded.metrics",
                (run_id, epoch, _json(metrics)),
            )
            db.execute("UPDATE runs SET heartbeat_at = ? WHERE id = ?", (time.time(), run_id))
            db.execute("DELETE FROM rungs WHERE run_id = ? AND epoch = ?", (run_id, epoch))
            if is_number(value):
                before = db.execute(
                    "SELECT COUNT(*) FROM rungs WHERE run_id = ? AND epoch < ?", (run_id, epoch)
                ).fetchone()[0]
                db.execute("INSERT INTO rungs VALUES (?,?,?,?,?)", (sweep_id, run_id, epoch, before + 1, float(value)))

    def _metric_of(self, run_id: str) -> tuple[str, str | None]:
        """A run's sweep id and the name of the metric its sweep optimises (None: it names none); cached."""
        if run_id not in self.metrics:
            rows = self._rows(
                "SELECT r.sweep_id, s.config FROM runs r JOIN sweeps s ON s.id = r.sweep_id WHERE r.id = ?", (run_id,)
            )
            if not rows:
                raise SweepError(f"unknown run id {run_id!r} in {self.path}; `lenet sweep status` lists the runs")
            metric = json.loads(rows[0]["config"]).get("metric") or {}
            self.metrics[run_id] = (rows[0]["sweep_id"], metric.get("name"))
        return self.metrics[run_id]

    def finish(self, run_id: str, state: str, summary: dict[str, Any] | None = None, error: str | None = None) -> None:
        """Close a run as finished, failed, diverged, stopped (hyperband) or stopped_early."""
        with self.transaction() as db:
            db.execute(
                "UPDATE runs SET state = ?, summary = ?, error = ?, ended_at = ? WHERE id = ?",
                (state, _json(summary) if summary is not None else None, error, time.time(), run_id),
            )

    def requeue(self, run_ids: str | list[str], reason: str) -> None:
        """Hand runs back (their worker was interrupted); the next claim resumes them from their checkpoints. A
        pack's runs go back in one transaction, so no claim in between can take one of them alone."""
        with self.transaction() as db:
            for run_id in [run_ids] if isinstance(run_ids, str) else run_ids:
                db.execute(
                    f"UPDATE runs SET state = '{PENDING}', error = ? WHERE id = ? AND state = '{RUNNING}'",
                    (reason, run_id),
                )

    def put_checkpoint(self, run_id: str, name: str, epoch: int, data: bytes) -> None:
        """Keep a copy of a run's checkpoint file `name` (best.pt, last.pt) in the store, replacing the last one."""
        with self.transaction() as db:
            db.execute(
                "INSERT INTO checkpoints VALUES (?,?,?,?,?) ON CONFLICT (run_id, name) DO UPDATE SET "
                "epoch = excluded.epoch, data = excluded.data, saved_at = excluded.saved_at",
                (run_id, name, epoch, data, time.time()),
            )

    def checkpoint(self, run_id: str, name: str) -> tuple[int, bytes] | None:
        """The stored copy of a run's checkpoint file `name`: (epoch, bytes), or None."""
        rows = self._rows("SELECT epoch, data FROM checkpoints WHERE run_id = ? AND name = ?", (run_id, name))
        return (rows[0][0], bytes(rows[0][1])) if rows else None

    def checkpoint_epoch(self, run_id: str, name: str) -> int | None:
        """The epoch of the stored copy of a run's checkpoint file `name` (its bytes left unread), or None."""
        rows = self._rows("SELECT epoch FROM checkpoints WHERE run_id = ? AND name = ?", (run_id, name))
        return rows[0][0] if rows else None

    def retry_failed(self, sweep_id: str) -> int:
        """Requeue the sweep's failed and diverged runs; returns how many."""
        self.sweep(sweep_id)
        with self.transaction() as db:
            # attempts = 0: a retry trains from scratch (a diverged run's checkpoint holds NaN state)
            count = db.execute(
                f"UPDATE runs SET state = '{PENDING}', error = NULL, attempts = 0 WHERE sweep_id = ? "
                f"AND state IN ('{FAILED}', '{DIVERGED}')",
                (sweep_id,),
            ).rowcount
            if count:
                db.execute(f"UPDATE sweeps SET state = '{RUNNING}' WHERE id = ? AND state = '{FINISHED}'", (sweep_id,))
        return count

    def should_stop(self, run_id: str) -> bool:
        """True when hyperband early termination stops this run now (W&B's rule, `sweeps.stop_runs`, decided by
        ablation.sweep.hyperband_stops from the indexed rungs: the run's own values and one cut-off).
        A stopped sweep lets runs in progress finish, as W&B does."""
        sweep_id, metric = self._metric_of(run_id)
        config = self.sweep(sweep_id)["config"]
        if not config.get("early_terminate") or not metric:
            return False
        state = self._rows("SELECT state FROM runs WHERE id = ?", (run_id,))[0]["state"]
        values = [r["value"] for r in self._rows("SELECT value FROM rungs WHERE run_id = ? ORDER BY epoch", (run_id,))]
        rule = hyperband(config)
        band = closest_band(rule.bands, len(values))
        if state != RUNNING or band is None:
            return False
        reached = self._rows("SELECT COUNT(*) AS n FROM rungs WHERE sweep_id = ? AND pos = ?", (sweep_id, band))
        order = "DESC" if rule.maximize else "ASC"  # best first
        threshold = self._rows(
            f"SELECT value FROM rungs WHERE sweep_id = ? AND pos = ? ORDER BY value {order} LIMIT 1 OFFSET ?",
            (sweep_id, band, int(rule.keep * reached[0]["n"])),
        )[0]["value"]
        return hyperband_stops(rule, values, band, threshold)

    def _engine_runs(self, sweep_id: str, histories: bool) -> list[Any]:
        """The sweep's runs as the `sweeps` package's SweepRun objects; with `histories`, each with its sweep
        metric's valid values (all the search reads), else none."""
        rows = self._rows("SELECT id, state, params, summary FROM runs WHERE sweep_id = ? ORDER BY idx", (sweep_id,))
        series: dict[str, list[dict[str, float]]] = {r["id"]: [] for r in rows}
        metric = (self.sweep(sweep_id)["config"].get("metric") or {}).get("name")
        if histories and metric:
            rungs = self._rows("SELECT run_id, value FROM rungs WHERE sweep_id = ? ORDER BY run_id, epoch", (sweep_id,))
            for r in rungs:
                series[r["run_id"]].append({metric: r["value"]})
        return [
            sweep_run(r["id"], r["state"], json.loads(r["params"]), series[r["id"]], _decoded(r["summary"]))
            for r in rows
        ]


def _decoded(text: str | None) -> Any:
    return json.loads(text) if text else None
