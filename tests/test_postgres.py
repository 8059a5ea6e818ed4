"""The store as a URL, and the same Store API and semantics on PostgreSQL as on SQLite (a real server that the test
session starts: tests/conftest.py `postgres_db`, a new database per test)."""

import json
import math
import os
import random
import re
import signal
import subprocess
import sys
from multiprocessing import get_context
from pathlib import Path

import psycopg
import pytest
from conftest import lenet, output_lines
from test_agent import wait_for_running
from test_sweep import HYPERBANDS, ROOT, claim_all, grid, write_smoke

from ablation.agent import WorkerSpec, pack_of, run_config, train_pack_claims
from ablation.errors import StoreError, SweepError
from ablation.fused import pack_key
from ablation.store import SCHEMA_VERSION, WAIT, Claim, Store, runs_home, schema_tables, store_location
from ablation.sweep import sweep_run, to_stop
from ablation.tracking import MemoryLogger
from ablation.train import load_checkpoint, train


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> Path | str:
    """Where a test's store is: a SQLite file, or a PostgreSQL URL (the same test runs on both)."""
    if request.param == "sqlite":
        return tmp_path / "lenet.db"
    return request.getfixturevalue("postgres_db")


def finish_all(store: Store, sweep_id: str) -> None:
    """Finish the runs in flight, then claim and finish the rest."""
    for run in store.runs(sweep_id):
        if run["state"] == "running":
            store.finish(run["id"], "finished", {})
    while isinstance(claim := store.claim(sweep_id, "w"), Claim):
        store.finish(claim.run_id, "finished", {})


# ---- The store as a URL ----


def test_a_store_location_is_a_path_a_sqlite_url_or_a_postgresql_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert store_location() == Path(os.environ["LENET_HOME"]) / "lenet.db"  # the default, as before
    assert store_location("rel/x.db") == Path("rel/x.db") and store_location(tmp_path) == tmp_path
    assert store_location(f"sqlite://{tmp_path}/s.db") == tmp_path / "s.db"
    url = "postgresql://lenet@db.example/sweeps"
    assert (
        store_location(url) == url
        and store_location("postgresql:///db?host=/run/pg") == "postgresql:///db?host=/run/pg"
    )
    assert runs_home(tmp_path / "s.db") == tmp_path and runs_home(url) == Path(os.environ["LENET_HOME"])
    monkeypatch.setenv("LENET_STORE", f"sqlite://{tmp_path}/elsewhere.db")
    with Store() as store:
        assert store.location == tmp_path / "elsewhere.db" and (tmp_path / "elsewhere.db").exists()


@pytest.mark.parametrize(
    "url,message",
    [
        ("sqlite://relative.db", "a SQLite URL names an absolute file, as sqlite:///abs/path.db"),
        ("mysql://u@h/db", "unknown scheme 'mysql'; use a path, sqlite:///abs/path.db, postgresql://"),
        ("postgresql:/h/db", "bad store URL 'postgresql:/h/db': no // after postgresql:; use a path"),
        ("postgresql://u:secret@h/db?sslmode", "bad store URL 'postgresql://u:***@h/db?sslmode'"),
    ],
)
def test_a_bad_store_url_is_one_line_naming_the_forms(url: str, message: str) -> None:
    with pytest.raises(StoreError, match=re.escape(message)) as error:
        Store(url)
    assert "\n" not in str(error.value) and "secret" not in str(error.value)


def test_an_unreachable_server_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(StoreError) as error:
        Store(f"postgresql://lenet:secret@/db?host={tmp_path}")  # no server on that socket
    message = str(error.value)
    assert "cannot reach the PostgreSQL store postgresql://lenet:***@/db" in message
    assert "connection refused" in message and "is the server running? check the URL" in message
    assert "\n" not in message and "secret" not in message
    result = lenet("sweep", "ls", env={"LENET_STORE": f"postgresql:///db?host={tmp_path}"})
    assert result.exit_code == 1 and output_lines(result)[0].startswith("error: cannot reach the PostgreSQL store")


# ---- The same API and semantics on both backends ----


def test_create_claim_log_finish_and_read_back(location: Path | str) -> None:
    with Store(location) as store:
        sweep_id = store.create_sweep({**grid(seed=[0, 1]), "name": "two"}, seed=2**40)
        assert store.sweep(sweep_id)["seed"] == 2**40 and store.sweeps()[0]["name"] == "two"
        claim = store.claim(sweep_id, "w", {"threads": 1})
        assert claim.attempt == 1 and claim.config["threads"] == 1 and claim.params["seed"] == 0
        store.log_epoch(claim.run_id, 1, {"val/acc": 40.5, "train/loss": math.nan})
        store.log_epoch(claim.run_id, 2, {"val/acc": 45.25})
        store.log_epoch(claim.run_id, 2, {"val/acc": 46.0})  # a resumed run logs epoch 2 again: replaced
        assert store.history(claim.run_id) == [
            {"val/acc": 40.5, "train/loss": None, "epoch": 1},
            {"val/acc": 46.0, "epoch": 2},
        ]
        assert store.heartbeat(claim.run_id)
        store.finish(claim.run_id, "finished", {"best/val_acc": 46.0})
        (run, pending) = store.runs(sweep_id)
        assert run["state"] == "finished" and run["summary"] == {"best/val_acc": 46.0} and run["attempts"] == 1
        assert run["config"]["seed"] == 0 and pending["state"] == "pending"
        assert isinstance(run["heartbeat_at"], float) and run["heartbeat_at"] <= run["ended_at"]
        with pytest.raises(SweepError, match="unknown sweep id 'nope'"):
            store.claim("nope", "w")
    with Store(location) as again:  # opened again: the schema is there, nothing is recreated
        assert [r["state"] for r in again.runs(sweep_id)] == ["finished", "pending"]


def test_claim_many_run_cap_retry_and_stop(location: Path | str) -> None:
    with Store(location) as store:
        sweep_id = store.create_sweep(grid(activation=["relu", "tanh"], seed=[0, 1, 2]), seed=0)
        activation = lambda claim: claim.params["activation"]  # noqa: E731
        packs = []
        while isinstance(claims := store.claim_many(sweep_id, "w", 4, key=activation), list):
            assert len({activation(c) for c in claims}) == 1
            packs.append([c.run_id for c in claims])
            for claim in claims:
                store.finish(claim.run_id, "failed" if claim.run_id.endswith("1") else "finished", {})
        assert sorted(i for p in packs for i in p) == [r["id"] for r in store.runs(sweep_id)] and len(packs) < 6
        assert store.sweep(sweep_id)["state"] == "finished"
        assert store.retry_failed(sweep_id) == 1 and store.sweep(sweep_id)["state"] == "running"
        store.set_sweep_state(sweep_id, "stopped")
        assert store.claim(sweep_id, "w") is None
        capped = store.create_sweep(
            {"method": "random", "run_cap": 3, "parameters": {"lr": {"distribution": "uniform", "min": 0.01, "max": 1}}}
        )
        finish_all(store, capped)
        assert len(store.runs(capped)) == 3


def test_a_dead_workers_run_is_requeued(location: Path | str, monkeypatch: pytest.MonkeyPatch) -> None:
    with Store(location) as store:
        sweep_id = store.create_sweep(grid(seed=[0, 1]), seed=0)
        first, second = store.claim(sweep_id, "a"), store.claim(sweep_id, "a")
        store.finish(second.run_id, "finished", {})
        assert store.claim(sweep_id, "b") == WAIT  # the first run is in flight and alive
        monkeypatch.setenv("LENET_HEARTBEAT_TIMEOUT", "0")
        again = store.claim(sweep_id, "b")
        assert again.run_id == first.run_id and again.attempt == 2 and again.params == first.params
        store.requeue(again.run_id, "interrupted")
        assert store.runs(sweep_id)[0]["error"] == "interrupted"
        third = store.claim(sweep_id, "c")
        assert third.attempt == 3
        store.finish(third.run_id, "finished", {})
        assert store.claim(sweep_id, "c") is None


def test_eight_processes_claim_a_grid_each_point_once(location: Path | str) -> None:
    store = Store(location)
    sweep_id = store.create_sweep(grid(activation=["relu", "tanh", "gelu"], seed=list(range(8))), seed=0)
    with get_context("spawn").Pool(8) as pool:
        claimed = sum(pool.starmap(claim_all, [(location, sweep_id, f"w{i}") for i in range(8)]), [])
    assert len(claimed) == 24 and len(set(claimed)) == 24  # no run twice, none skipped
    runs = store.runs(sweep_id)
    assert len({(r["params"]["activation"], r["params"]["seed"]) for r in runs}) == 24
    assert all(r["state"] == "finished" and r["attempts"] == 1 for r in runs)
    assert store.sweep(sweep_id)["state"] == "finished"


def test_add_runs_records_each_look_once(location: Path | str) -> None:
    look = {"look": 1, "seeds": 1, "target": 3, "alpha": 0.01, "equivalence": 0.5, "comparisons": 1}
    look |= {"inconclusive": 1, "outcome": "extended", "open_comparisons": [["relu", "tanh"]]}
    with Store(location) as store:
        sweep_id = store.create_sweep(grid(activation=["relu", "tanh"], seed=[0]), seed=0)
        assert store.looks(sweep_id) == [] and store.claim(sweep_id, "w").params["activation"] == "relu"
        with pytest.raises(SweepError, match="2 run\\(s\\) pending or running"):
            store.add_runs(sweep_id, [{"activation": "relu", "seed": 1}], look)
        finish_all(store, sweep_id)
        ids = store.add_runs(sweep_id, [{"activation": a, "seed": 1} for a in ("relu", "tanh")], look)
        assert ids == [f"{sweep_id}-002", f"{sweep_id}-003"] and store.sweep(sweep_id)["state"] == "running"
        (recorded,) = store.looks(sweep_id)
        assert recorded["open_comparisons"] == [["relu", "tanh"]] and recorded["runs_added"] == 2
        assert recorded["alpha"] == 0.01  # a double, not PostgreSQL's 4-byte REAL
        finish_all(store, sweep_id)
        with pytest.raises(SweepError, match="has 1 look\\(s\\) recorded"):
            store.add_runs(sweep_id, [], look)


@pytest.mark.parametrize("early_terminate", HYPERBANDS, ids=["min_iter", "strict", "max_iter"])
def test_hyperband_decides_the_same_on_both_backends(tmp_path: Path, postgres_db: str, early_terminate: dict) -> None:
    rng = random.Random(str(early_terminate))
    config = {**grid(seed=list(range(40))), "early_terminate": early_terminate}
    logged = []  # (run index, epoch, value), then the runs to finish
    for i in range(40):
        quality = rng.gauss(50, 10)
        for epoch in range(1, rng.randint(0, 12) + 1):
            logged.append((i, epoch, quality + epoch + rng.gauss(0, 2) if rng.random() > 0.1 else math.nan))
    finished = {i for i in range(40) if rng.random() < 0.3}
    decisions = []
    for location in (tmp_path / "lenet.db", postgres_db):
        with Store(location) as store:
            sweep_id = store.create_sweep(config, sweep_id="hb", seed=0)
            claims = store.claim_many(sweep_id, "w", 40)
            for i, epoch, value in logged:
                store.log_epoch(claims[i].run_id, epoch, {"val/acc": value})
            for i in finished:
                store.finish(claims[i].run_id, "finished", {})
            runs = store.runs(sweep_id)
            decisions.append({r["id"] for r in runs if store.should_stop(r["id"])})
            history = [sweep_run(r["id"], r["state"], r["params"], store.history(r["id"]), r["summary"]) for r in runs]
            assert decisions[-1] == to_stop(config, history)
    assert decisions[0] == decisions[1] and decisions[0]


# ---- PostgreSQL's own checks ----


def test_a_database_that_does_not_exist_is_named(postgres_db: str) -> None:
    missing = postgres_db.replace("/test_", "/missing_")
    with pytest.raises(StoreError, match='database "missing_.*" does not exist\\); create it \\(createdb NAME\\)'):
        Store(missing)


def test_a_database_of_another_program_is_refused_untouched(postgres_db: str) -> None:
    with psycopg.connect(postgres_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE customers (id INTEGER)")
    with pytest.raises(StoreError, match="is a PostgreSQL database of another program \\(tables: customers\\)"):
        Store(postgres_db)
    with psycopg.connect(postgres_db) as conn:
        tables = [r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
    assert tables == ["customers"]


def test_the_schema_matches_sqlites_and_a_newer_one_is_refused(postgres_db: str) -> None:
    Store(postgres_db).close()
    with psycopg.connect(postgres_db, autocommit=True) as conn:
        columns = {}
        for table, column in conn.execute(
            "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = 'public' "
            "ORDER BY table_name, ordinal_position"
        ):
            columns.setdefault(table, []).append(column)
        assert {t: tuple(c) for t, c in columns.items() if t != "meta"} == schema_tables(SCHEMA_VERSION)
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(StoreError, match="made by a newer lenet \\(schema 99; this one reads up to"):
        Store(postgres_db)


def test_a_schema_4_database_is_migrated_in_place(postgres_db: str) -> None:
    with Store(postgres_db) as store:  # a store as the first PostgreSQL release left it: no checkpoints table
        sweep_id = store.create_sweep(grid(seed=[0]), seed=0)
    with psycopg.connect(postgres_db, autocommit=True) as conn:
        conn.execute("DROP TABLE checkpoints")
        conn.execute("UPDATE meta SET value = '4' WHERE key = 'schema_version'")
    with Store(postgres_db) as store:
        assert store.sweep(sweep_id)["state"] == "running"  # kept
        claim = store.claim(sweep_id, "w")
        store.put_checkpoint(claim.run_id, "last.pt", 3, b"weights")
        assert store.checkpoint(claim.run_id, "last.pt") == (3, b"weights")
    with psycopg.connect(postgres_db, autocommit=True) as conn:
        assert conn.execute("SELECT value FROM meta").fetchone()[0] == str(SCHEMA_VERSION)


def test_processes_opening_a_schema_4_database_at_once_migrate_it_once(postgres_db: str) -> None:
    with Store(postgres_db) as store:
        sweep_id = store.create_sweep(grid(seed=[0]), seed=0)
    with psycopg.connect(postgres_db, autocommit=True) as conn:  # as the first PostgreSQL release left it
        conn.execute("DROP TABLE checkpoints")
        conn.execute("UPDATE meta SET value = '4' WHERE key = 'schema_version'")
    opener = "import sys; from ablation.store import Store; Store(sys.argv[1]).close()"
    command = [sys.executable, "-c", opener, postgres_db]
    procs = [subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE) for _ in range(8)]
    assert [p.wait(timeout=60) for p in procs] == [0] * 8, [p.stderr.read() for p in procs]
    with Store(postgres_db) as store:
        assert store.sweep(sweep_id)["state"] == "running"
        store.put_checkpoint(store.claim(sweep_id, "w").run_id, "last.pt", 1, b"weights")  # the new table is there


def test_processes_opening_a_new_database_at_once_create_the_schema_once(postgres_db: str) -> None:
    opener = "import sys; from ablation.store import Store; Store(sys.argv[1]).close()"
    procs = [subprocess.Popen([sys.executable, "-c", opener, postgres_db], cwd=ROOT) for _ in range(4)]
    assert [p.wait(timeout=60) for p in procs] == [0] * 4
    with Store(postgres_db) as store:
        assert store.sweeps() == []


def test_a_shared_store_takes_a_teacher_this_machine_lacks(postgres_db: str) -> None:
    # A PostgreSQL sweep's agents may run on other hosts: a teacher missing here is a note (on SQLite, a refusal).
    result = lenet(
        "sweep", "create", ROOT / "sweeps" / "distill.yaml", "--backend", "local", env={"LENET_STORE": postgres_db}
    )
    assert result.exit_code == 0, result.output
    assert "note: teacher /path/to/teachers/resnet20/RUN_ID/best.pt is not a file here" in result.output
    with Store(postgres_db) as store:
        assert len(store.sweeps()) == 1


# ---- `lenet agent` on a PostgreSQL store, from several homes (standing in for hosts) ----


def test_agents_in_two_homes_share_one_postgresql_store(folder_dir: Path, tmp_path: Path, postgres_db: str) -> None:
    first = {"LENET_STORE": postgres_db, "LENET_HOME": str(tmp_path / "host-a")}
    second = {"LENET_STORE": postgres_db, "LENET_HOME": str(tmp_path / "host-b")}
    created = lenet("sweep", "create", write_smoke(tmp_path, folder_dir, epochs=1), "--backend", "local", env=first)
    assert created.exit_code == 0, created.output
    sweep_id = created.output.split("created sweep ")[1].split()[0]
    one = lenet("agent", sweep_id, "--count", "1", "--wandb", "disabled", env=first)
    assert one.exit_code == 0, one.output
    rest = subprocess.run(  # host b: a real process, with two worker processes of its own
        [sys.executable, str(ROOT / "cli.py"), "agent", sweep_id, "--wandb", "disabled", "--workers", "2"],
        env={**os.environ, **second},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert rest.returncode == 0, rest.stdout + rest.stderr
    assert f"sweep {sweep_id}: 4 finished, 0 failed" in rest.stdout
    with Store(postgres_db) as store:
        runs = store.runs(sweep_id)
    assert all(r["state"] == "finished" and r["attempts"] == 1 for r in runs)
    homes = {r["id"]: [h for h in ("host-a", "host-b") if (tmp_path / h / "runs" / r["id"]).is_dir()] for r in runs}
    assert list(homes.values()).count(["host-a"]) == 1 and list(homes.values()).count(["host-b"]) == 3
    assert not (tmp_path / "host-a" / "lenet.db").exists() and not (tmp_path / "host-b" / "lenet.db").exists()
    status = lenet("sweep", "status", sweep_id, env=second)
    assert status.exit_code == 0 and "4 finished" in status.output
    listed = lenet("--store", postgres_db, "sweep", "ls")  # the option, in place of LENET_STORE
    assert listed.exit_code == 0 and sweep_id in listed.output
    exported = lenet("sweep", "export", sweep_id, tmp_path / "bundle.json", env=first)
    assert exported.exit_code == 0, exported.output
    bundle = json.loads((tmp_path / "bundle.json").read_text())
    assert len(bundle["runs"]) == 4 and all(len(r["history"]) == 1 for r in bundle["runs"])  # one epoch each


@pytest.mark.slow
def test_a_run_killed_on_one_host_is_trained_on_the_other(
    folder_dir: Path, tmp_path: Path, postgres_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LENET_STORE", postgres_db)
    monkeypatch.setenv("LENET_HEARTBEAT_TIMEOUT", "3")
    created = lenet("sweep", "create", write_smoke(tmp_path, folder_dir, epochs=8, batch_size=16), "--backend", "local")
    sweep_id = created.output.split("created sweep ")[1].split()[0]
    agent = [sys.executable, str(ROOT / "cli.py"), "agent", sweep_id, "--wandb", "disabled"]
    home_a = {**os.environ, "LENET_HOME": str(tmp_path / "host-a")}
    victim = subprocess.Popen(agent, env=home_a, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store = Store(postgres_db)
    killed = wait_for_running(store, sweep_id, min_epochs=3)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    before = store.history(killed["id"])
    home_b = {**os.environ, "LENET_HOME": str(tmp_path / "host-b")}
    rest = subprocess.run(agent, env=home_b, capture_output=True, text=True, timeout=240)
    assert rest.returncode == 0, rest.stdout + rest.stderr
    runs = store.runs(sweep_id)
    assert len(runs) == 4 and all(r["state"] == "finished" for r in runs)
    again = next(r for r in runs if r["id"] == killed["id"])
    # Requeued after its heartbeats stopped and resumed on host b from the copy of its last.pt kept in the store
    # (the copy lags the log by one epoch): the first epochs host a logged are not trained again.
    assert again["attempts"] == 2 and again["summary"]["epochs_run"] == 8
    after = store.history(killed["id"])
    assert [h["epoch"] for h in after] == list(range(1, 9))
    assert after[0] == before[0]  # wall-clock metrics included: epoch 1 was not trained again
    assert (tmp_path / "host-b" / "runs" / killed["id"] / "last.pt").exists()
    # A third host evaluates any run by its id: its best.pt comes from the store.
    tested = lenet("test", killed["id"], "--device", "cpu", env={"LENET_HOME": str(tmp_path / "host-c")})
    assert tested.exit_code == 0, tested.output
    assert f"test accuracy {again['summary']['test/acc']:.2f}%" in tested.output


def test_a_resumed_pack_member_starts_from_the_stores_newer_checkpoint(
    folder_dir: Path, tmp_path: Path, postgres_db: str
) -> None:
    store = Store(postgres_db)
    sweep = grid(data="folder", data_dir=str(folder_dir), val_size=20, batch_size=32, device="cpu", epochs=3, seed=0)
    sweep_id = store.create_sweep(sweep, seed=0)
    claim = store.claim(sweep_id, "host-b")
    assert isinstance(claim, Claim)
    spec = WorkerSpec((sweep_id,), "w", postgres_db, fuse=4, home=tmp_path / "host-a")
    config = run_config(claim.config, spec)
    # Host b trains epochs 1 and 2 and keeps its last.pt in the store; host a holds the copy of epoch 1 only.
    elsewhere = tmp_path / "host-b" / "runs" / claim.run_id
    for epochs_done in (1, 2):
        train(config, MemoryLogger(), elsewhere, resume=True, should_stop=lambda n=epochs_done: True)
        if epochs_done == 1:
            local = spec.home / "runs" / claim.run_id
            local.mkdir(parents=True)
            (local / "last.pt").write_bytes((elsewhere / "last.pt").read_bytes())
    store.put_checkpoint(claim.run_id, "last.pt", 2, (elsewhere / "last.pt").read_bytes())
    store.requeue(claim.run_id, "host b stopped")
    again = store.claim(sweep_id, "host-a")
    assert isinstance(again, Claim) and again.attempt == 2
    # The pack it may join is the one of runs that ended epoch 2, the store's newer copy ...
    assert pack_of(again, spec, store) == (pack_key(config), 2)
    local = spec.home / "runs" / claim.run_id / "last.pt"
    assert load_checkpoint(local)["epoch"] == 1  # (read under the claim's lock: the epoch only, not the file)
    local.write_bytes(b"torn")  # a damaged local copy: the store's copy still decides, and replaces it below
    assert pack_of(again, spec, store) == (pack_key(config), 2)
    # ... and the pack trains from it: epoch 3 only, as one pack with no other member.
    train_pack_claims(store, [again], spec, lambda kind, details: None)
    history = [row["epoch"] for row in store.history(claim.run_id)]
    assert history == [3] and store.runs(sweep_id)[0]["state"] == "finished"
    assert load_checkpoint(local)["epoch"] == 3
