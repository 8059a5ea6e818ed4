"""The store's integrity: a schema version and in-place migration, foreign and damaged files left untouched,
full and read-only disks named as such (on a real 2 MB tmpfs), and each run's full config kept from its claim."""

import gc
import hashlib
import json
import os
import random
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import lenet, tmpfs
from test_sweep import ROOT, grid, write_smoke

from ablation.config import PRESETS, RunConfig
from ablation.errors import OutputError, StoreError, StoreWriteError
from ablation.store import SCHEMA_VERSION, Store, schema_tables
from ablation.train import cpu_threads
from analysis.results import from_store, read_bundle

# The first release's schema, verbatim: it set no user_version, so such a file reads as version 0.
FIRST_RELEASE_SCHEMA = """
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


def home() -> Path:
    return Path(os.environ["LENET_HOME"])


def create(path: Path) -> str:
    result = lenet("sweep", "create", path, "--backend", "local", "--seed", "0")
    assert result.exit_code == 0, result.output
    return result.output.split("created sweep ")[1].split()[0]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def user_version(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        return db.execute("PRAGMA user_version").fetchone()[0]
    finally:
        db.close()


# ---- Schema version and migration ----


def test_a_new_store_carries_the_schema_version(tmp_path: Path) -> None:
    with Store(tmp_path / "lenet.db") as store:
        store.create_sweep(grid(seed=[0]), seed=0)
    assert user_version(tmp_path / "lenet.db") == SCHEMA_VERSION
    db = sqlite3.connect(tmp_path / "lenet.db")
    assert "config" in [r[1] for r in db.execute("PRAGMA table_info(runs)")]
    db.close()


def first_release_store(path: Path, seeds: int = 1) -> str:
    """A store as the first release left it: its tables, user_version 0, one finished run without a config."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(FIRST_RELEASE_SCHEMA)
    config = grid(preset="modern", activation="tanh", seed=list(range(seeds)))
    db.execute(
        "INSERT INTO sweeps VALUES ('old00001', 'old', 'local', ?, 0, 'running', 'lenet', NULL, 1.0)",
        (json.dumps(config),),
    )
    db.execute(
        "INSERT INTO runs (id, sweep_id, idx, params, state, attempts, created_at, summary) "
        "VALUES ('old00001-000', 'old00001', 0, ?, 'finished', 1, 1.0, ?)",
        (json.dumps({"preset": "modern", "activation": "tanh", "seed": 0}), json.dumps({"best/val_acc": 40.0})),
    )
    db.execute("INSERT INTO history VALUES ('old00001-000', 1, ?)", (json.dumps({"val/acc": 40.0}),))
    db.close()
    return "old00001"


def test_a_first_release_store_is_migrated_in_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "lenet.db"
    sweep_id = first_release_store(path, seeds=2)
    assert user_version(path) == 0
    with Store(path) as store:
        assert user_version(path) == SCHEMA_VERSION
        (old,) = store.runs(sweep_id)  # kept, with no stored config: reports rebuild it from today's presets
        assert old["state"] == "finished" and old["config"] is None and store.history(old["id"])[0]["val/acc"] == 40.0
        monkeypatch.setitem(PRESETS["modern"], "lr", 0.5)
        assert from_store(store, sweep_id).runs.set_index("run_id").loc[old["id"], "lr"] == 0.5
        new = store.claim(sweep_id, "w", {"threads": 1})  # runs claimed from now on keep theirs
        assert new.config["lr"] == 0.5 and store.runs(sweep_id)[1]["config"] == new.config
    with Store(path) as store:  # opening again migrates nothing
        assert user_version(path) == SCHEMA_VERSION and len(store.runs(sweep_id)) == 2


@pytest.mark.parametrize("round_", range(3))  # each round a new race (before reads took one snapshot: ~1 in 10 failed)
def test_processes_opening_an_old_store_at_once_migrate_it_once(tmp_path: Path, round_: int) -> None:
    path = tmp_path / "lenet.db"
    first_release_store(path, seeds=3)
    opener = "import sys; from ablation.store import Store; Store(sys.argv[1]).close()"
    procs = [subprocess.Popen([sys.executable, "-c", opener, str(path)], stderr=subprocess.PIPE) for _ in range(8)]
    assert [proc.wait(timeout=60) for proc in procs] == [0] * 8, [proc.stderr.read() for proc in procs]
    assert user_version(path) == SCHEMA_VERSION
    with Store(path) as store:
        assert all(store.claim("old00001", "w").config for _ in range(2))
        assert [r["config"] is not None for r in store.runs("old00001")] == [False, True, True]


# ---- Files that are not a lenet store we can use: one line, and the file untouched ----


def real_store_bytes(tmp_path: Path) -> bytes:
    """A lenet store with a sweep, runs and histories (several pages), closed (no -wal left)."""
    with Store(tmp_path / "source" / "lenet.db") as store:
        sweep_id = store.create_sweep(grid(seed=list(range(6))), seed=0)
        while (claim := store.claim(sweep_id, "w")) is not None:
            for epoch in range(1, 6):
                store.log_epoch(claim.run_id, epoch, {"val/acc": 10.0 * epoch, "note": "x" * 200})
            store.finish(claim.run_id, "finished", {"best/val_acc": 50.0})
    return (tmp_path / "source" / "lenet.db").read_bytes()


def foreign_db(path: Path) -> None:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE foo (x)")
    db.execute("INSERT INTO foo VALUES (1)")
    db.commit()
    db.close()


def newer_store(path: Path) -> None:
    db = sqlite3.connect(path)
    db.executescript(FIRST_RELEASE_SCHEMA)
    db.execute("PRAGMA user_version = 99")
    db.close()


def garbage_in_the_middle(data: bytes) -> bytes:
    page = 4096
    return data[: 2 * page] + random.Random(0).randbytes(3000) + data[2 * page + 3000 :]


BAD_FILES: dict[str, tuple[Callable[[Path, Path], None], str]] = {
    "not sqlite": (lambda p, t: p.write_bytes(b"garbage" * 1000), "lenet.db is not a SQLite file"),
    "empty tables of another program": (
        lambda p, t: foreign_db(p),
        "a SQLite database of another program (tables: foo)",
    ),
    "newer lenet": (lambda p, t: newer_store(p), "was made by a newer lenet (schema 99"),
    "truncated": (lambda p, t: p.write_bytes(real_store_bytes(t)[: 3 * 4096]), "is damaged (corrupt"),
    "garbage in the middle": (
        lambda p, t: p.write_bytes(garbage_in_the_middle(real_store_bytes(t))),
        "is damaged (corrupt",
    ),
}


@pytest.mark.parametrize("case", BAD_FILES, ids=list(BAD_FILES))
def test_a_file_that_is_not_a_usable_store_is_named_and_left_untouched(case: str, tmp_path: Path) -> None:
    make, message = BAD_FILES[case]
    home().mkdir(parents=True)
    path = home() / "lenet.db"
    make(path, tmp_path)
    before = sha256(path)
    for command in (("sweep", "ls"), ("sweep", "status", "abc"), ("agent", "abc", "--wandb", "disabled")):
        result = lenet(*command)
        assert result.exit_code == 1 and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
        assert ("corrupt" in result.output) == (message == "is damaged (corrupt")  # corrupt only when it is
    with pytest.raises(StoreError, match="LENET_HOME"):  # the fix
        Store()
    assert sha256(path) == before and sorted(os.listdir(home())) == ["lenet.db"]  # no -wal/-shm, no change


def test_commands_that_read_sweeps_never_create_a_store() -> None:
    commands = [("sweep", "status", "abc"), ("sweep", "stop", "abc"), ("report", "abc"), ("agent", "abc")]
    for command in [*commands, ("sweep", "extend", "abc", "--until-resolved")]:
        result = lenet(*command)
        assert result.exit_code == 1 and f"no sweep store at {home() / 'lenet.db'}" in result.output, result.output
        assert "lenet sweep create FILE" in result.output  # the fix
    listed = lenet("sweep", "ls")  # nothing to list is not an error
    assert listed.exit_code == 0 and "no sweeps yet" in listed.output and "lenet sweep create FILE" in listed.output
    result = lenet("test", "abc123-000")  # a run id: its best.pt is looked up, no store is opened
    assert result.exit_code == 1 and "abc123-000 is neither a checkpoint file nor a run" in result.output
    assert not home().exists()


def test_lenet_home_a_file_and_a_store_path_that_is_a_folder() -> None:
    home().parent.mkdir(parents=True, exist_ok=True)
    home().write_text("not a folder")
    for command in (("sweep", "status", "abc"), ("sweep", "create", ROOT / "sweeps" / "smoke.yaml")):
        result = lenet(*command)
        assert result.exit_code == 1 and "is a file, not a folder for the sweep store" in result.output
    home().unlink()
    (home() / "lenet.db").mkdir(parents=True)
    result = lenet("sweep", "ls")
    assert result.exit_code == 1 and "lenet.db is a folder, not a file" in result.output


# ---- Full and read-only disks (a real tmpfs) ----


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 2 MB tmpfs for LENET_HOME; skipped, with the reason, where it cannot be mounted."""
    with tmpfs(tmp_path / "disk", "size=2m") as mount:
        yield mount


def fill(folder: Path) -> Path:
    """Write a file until the disk is full (ENOSPC), to the last byte."""
    path = folder / "filler"
    with open(path, "wb", buffering=0) as fh:
        for size in (1 << 16, 4096, 512, 1):
            try:
                while True:
                    fh.write(b"\0" * size)
            except OSError:
                pass
    assert os.statvfs(folder).f_bavail == 0
    return path


def test_a_full_disk_is_named_reads_still_work_and_nothing_is_lost(
    small_disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LENET_HOME", str(small_disk / "home"))
    sweep_id = create(ROOT / "sweeps" / "smoke.yaml")
    gc.collect()  # the CLI's Store, as when its process exits
    assert sorted(os.listdir(home())) == ["lenet.db"]  # closed: the -shm a reader needs must be made anew
    filler = fill(small_disk)
    for command in (("sweep", "ls"), ("sweep", "status", sweep_id)):
        result = lenet(*command)
        assert result.exit_code == 0 and sweep_id in result.output, result.output
        assert "disk full" in result.output and "corrupt" not in result.output
    with Store() as store, pytest.raises(StoreWriteError) as error:  # also an OutputError: not the run's fault
        store.claim(sweep_id, "w")
    assert str(error.value).startswith(f"disk full: cannot write the sweep store {home() / 'lenet.db'}")
    assert "\n" not in str(error.value) and "LENET_HOME" in str(error.value) and "corrupt" not in str(error.value)
    assert isinstance(error.value, OutputError) and isinstance(error.value, StoreError)
    result = lenet("agent", sweep_id, "--wandb", "disabled")
    assert result.exit_code == 1 and "error: disk full" in result.output and "Traceback" not in result.output

    filler.unlink()  # an agent with the store open (its -shm in place) when the disk fills up
    with Store() as store:
        claim = store.claim(sweep_id, "w")
        store.log_epoch(claim.run_id, 1, {"val/acc": 10.0})
        filler = fill(small_disk)
        with pytest.raises(StoreWriteError, match="^disk full: .*the store is intact"):
            for epoch in range(2, 200):  # the -wal file may still hold a few epochs
                store.log_epoch(claim.run_id, epoch, {"val/acc": 10.0, "note": "x" * 4000})
        assert store.heartbeat(claim.run_id) is False  # best effort: the next log_epoch says why
        assert lenet("sweep", "ls").exit_code == 0
        filler.unlink()
        assert store.heartbeat(claim.run_id) is True
        store.finish(claim.run_id, "finished", {"best/val_acc": 10.0})
    with Store() as store:
        run = next(r for r in store.runs(sweep_id) if r["id"] == claim.run_id)  # the grid's other points: pending
        assert run["state"] == "finished" and store.history(run["id"])[0]["val/acc"] == 10.0


def test_a_read_only_disk_is_named_and_still_listed(small_disk: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LENET_HOME", str(small_disk / "home"))
    sweep_id = create(ROOT / "sweeps" / "smoke.yaml")
    gc.collect()  # the CLI's Store (its file open for writing), as when its process exits
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    result = lenet("sweep", "ls")
    assert result.exit_code == 0 and sweep_id in result.output and "read-only" in result.output
    with (
        Store() as store,
        pytest.raises(StoreWriteError, match="^read-only: cannot write the sweep store .*LENET_HOME"),
    ):
        store.claim(sweep_id, "w")
    result = lenet("sweep", "create", ROOT / "sweeps" / "smoke.yaml", "--backend", "local")
    assert result.exit_code == 1 and "error: read-only" in result.output and "corrupt" not in result.output


# ---- Each run's full config, stored when it is claimed ----


def test_a_run_keeps_its_config_through_resumes_and_a_retry_starts_afresh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Store(tmp_path / "lenet.db") as store:
        sweep_id = store.create_sweep(grid(preset="modern", seed=[0]), seed=0)
        first = store.claim(sweep_id, "a", {"threads": 1})
        assert first.config == RunConfig.from_dict({"threads": 1, **first.params}).to_dict()
        monkeypatch.setitem(PRESETS["modern"], "lr", 0.5)
        store.requeue(first.run_id, "interrupted")
        resumed = store.claim(sweep_id, "b", {"threads": 2})
        assert resumed.attempt == 2 and resumed.config == first.config  # a resume trains on as it started
        store.finish(resumed.run_id, "failed", error="boom")
        store.retry_failed(sweep_id)
        fresh = store.claim(sweep_id, "b", {"threads": 2})
        assert fresh.attempt == 1 and fresh.config["lr"] == 0.5 and fresh.config["threads"] == 2


def test_a_packs_runs_are_requeued_together_and_claimed_again_as_one_pack(tmp_path: Path) -> None:
    with Store(tmp_path / "lenet.db") as store:
        sweep_id = store.create_sweep(grid(preset="modern", seed=[0, 1, 2]), seed=0)
        pack = store.claim_many(sweep_id, "a", 2)
        store.requeue([c.run_id for c in pack], "interrupted")  # one transaction: no claim sees half of the pack
        runs = {r["id"]: r for r in store.runs(sweep_id)}
        assert all(runs[c.run_id]["state"] == "pending" and runs[c.run_id]["error"] == "interrupted" for c in pack)
        again = store.claim_many(sweep_id, "b", 2)
        assert [(c.run_id, c.attempt) for c in again] == [(c.run_id, 2) for c in pack]


def test_editing_a_preset_relabels_no_trained_run(
    folder_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sweep_id = create(write_smoke(tmp_path, folder_dir, epochs=1))
    result = lenet("agent", sweep_id, "--wandb", "disabled", "--count", "1")
    assert result.exit_code == 0, result.output
    trained = dict(PRESETS["modern"])
    monkeypatch.setitem(PRESETS["modern"], "lr", trained["lr"] * 7)
    monkeypatch.setitem(PRESETS["modern"], "weight_decay", 0.123)
    with Store() as store:
        runs = from_store(store, sweep_id).runs
    (run,) = runs[runs["state"] == "finished"].to_dict("records")  # the grid's other points are pending
    assert run["lr"] == trained["lr"] and run["weight_decay"] == trained["weight_decay"]
    assert run["threads"] == cpu_threads(0)  # the thread count it trained with (one worker: all cores)
    assert lenet("sweep", "export", sweep_id, tmp_path / "bundle.json").exit_code == 0
    exported = read_bundle(tmp_path / "bundle.json").runs.set_index("run_id").loc[run["run_id"]]
    assert exported["lr"] == trained["lr"] and exported["weight_decay"] == trained["weight_decay"]


def test_schema_tables_follow_the_migrations() -> None:
    assert schema_tables(0) == {}
    assert set(schema_tables(1)) == {"sweeps", "runs", "history"}
    assert schema_tables(SCHEMA_VERSION)["runs"][-1] == "config"
