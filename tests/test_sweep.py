"""Sweep files, validation, the `sweeps`-package adapter and the SQLite store."""

import functools
import math
import random
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pytest
import yaml

from ablation.agent import WorkerSpec, pack_of
from ablation.errors import StoreError, SweepError
from ablation.store import WAIT, Claim, Store
from ablation.sweep import grid_size, load_sweep_file, plain, suggest, sweep_run, to_stop, validate_sweep

ROOT = Path(__file__).resolve().parents[1]
SWEEP_FILES = sorted((ROOT / "sweeps").glob("*.yaml"))
STUDIES = [p for p in SWEEP_FILES if p.stem not in ("smoke", "search")]


def grid(**parameters) -> dict:
    return {
        "method": "grid",
        "metric": {"name": "val/acc", "goal": "maximize"},
        "parameters": {k: ({"values": v} if isinstance(v, list) else {"value": v}) for k, v in parameters.items()},
    }


def test_the_expected_sweep_files_exist() -> None:
    names = {p.stem for p in SWEEP_FILES}
    assert {"init", "optim", "reg", "activation", "path", "leave_one_out", "search", "smoke"} <= names


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.name)
def test_every_sweep_file_is_valid(path: Path) -> None:
    config = load_sweep_file(path)  # W&B's schema and the run config
    assert path.read_text().startswith("# Question:")
    assert config["metric"] == {"name": "val/acc", "goal": "maximize"}
    assert config["command"] == ["lenet", "train", "${args_no_hyphens}"]


def test_settings_fixed_at_creation_are_named_in_the_question(tmp_path: Path) -> None:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({**grid(epochs=20, seed=[0, 1]), "description": "Q?"}))
    config = load_sweep_file(path, {"epochs": "05"})
    note = "(Created with epochs=5, replacing the file's values.)"  # the value as stored, not as typed
    assert config["description"] == f"Q? {note}" and config["parameters"]["epochs"] == {"value": 5}
    path.write_text(yaml.safe_dump(config))  # created again with the same setting: named once
    assert load_sweep_file(path, {"epochs": "5"})["description"] == f"Q? {note}"


def test_a_value_valid_beside_the_sweeps_fixed_settings_is_valid() -> None:
    validate_sweep(grid(preset="best_teacher", teacher="/t/best.pt", seed=[0, 1]))  # the preset needs a teacher
    with pytest.raises(SweepError, match="parameter 'preset': preset=best_teacher distils from a teacher"):
        validate_sweep(grid(preset="best_teacher", seed=[0, 1]))


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.name)
def test_every_study_cell_has_three_seeds(path: Path) -> None:
    seeds = load_sweep_file(path)["parameters"]["seed"]["values"]
    assert len(set(seeds)) >= 3


@pytest.mark.parametrize(
    "config,message",
    [
        (
            {"method": "grid", "parameters": {"lr": {"values": [0.1]}}, "metric": {"name": "val/acc", "goal": "up"}},
            "goal",
        ),
        ({**grid(lr=[0.1]), "method": "hill_climb"}, "method"),
        (grid(learning_rate=[0.1]), "unknown parameter 'learning_rate'"),
        (grid(activation=["relu", "swish"]), "activation='swish' is not valid"),
        (grid(lr=[]), "empty values list"),
        (grid(lr=[-1.0]), "out of range"),
        (
            grid(arch=["lenet5", "resnet8"], dropout=[0.0, 0.5], seed=[0, 1]),
            r"2 of 8 parameter combinations fail \(arch=resnet8 dropout=0.5 seed=0, arch=resnet8 dropout=0.5 seed=1\): "
            r"dropout is on LeNet-5's hidden fc layers",
        ),
        ({**grid(lr=[0.1]), "metric": {"name": "accuracy", "goal": "maximize"}}, "metric 'accuracy' is never logged"),
        ({"method": "grid", "parameters": {"opt": {"parameters": {"lr": {"values": [0.1]}}}}}, "nested"),
        ({"method": "grid", "parameters": {"lr": {"min": 0.01, "max": 0.1}}}, "continuous range"),
    ],
)
def test_invalid_sweeps_are_rejected(config: dict, message: str) -> None:
    with pytest.raises(SweepError, match=message):
        validate_sweep(config)


def test_deprecated_exponent_distributions_get_wandbs_own_message() -> None:
    with pytest.raises(SweepError, match="Use log_uniform_values"):  # min/max would be exponents, not values
        validate_sweep(
            {"method": "random", "parameters": {"lr": {"distribution": "log_uniform", "min": -9.2, "max": -2.3}}}
        )


def test_grid_size_matches_the_engine() -> None:
    config = grid(activation=["relu", "tanh"], seed=[0, 1, 2], epochs=2)
    config["parameters"]["batch_size"] = {"distribution": "int_uniform", "min": 30, "max": 32}
    assert grid_size(config) == 18
    runs, params = [], suggest(config, [], 0)
    while params is not None:
        runs.append(sweep_run(f"r{len(runs)}", "finished", params, [], {}))
        params = suggest(config, runs, 0)
    assert len(runs) == 18 and len({tuple(sorted(r.config.items(), key=str)).__repr__() for r in runs}) == 18


def test_engine_values_are_plain_python() -> None:
    config = {
        "method": "random",
        "parameters": {
            "lr": {"distribution": "log_uniform_values", "min": 0.01, "max": 0.1},
            "batch_size": {"distribution": "q_uniform", "min": 32, "max": 256, "q": 32},
        },
    }
    params = suggest(config, [], seed=1)
    assert type(params["lr"]) is float and not isinstance(params["lr"], np.generic)
    assert plain(np.int64(3)) == 3 and type(plain(np.float32(0.5))) is float


def test_random_search_is_reproducible_from_the_sweep_seed() -> None:
    config = {"method": "random", "parameters": {"lr": {"distribution": "uniform", "min": 0.01, "max": 0.1}}}
    draw = lambda seed: [suggest(config, [None] * i, seed)["lr"] for i in range(3)]
    assert draw(7) == draw(7) and draw(7) != draw(8)
    assert len(set(draw(7))) == 3


def test_engine_sees_history_and_summary() -> None:
    run = sweep_run("a", "finished", {"lr": 0.1}, [{"val/acc": 40.0}, {"val/acc": 55.0}], {"test/acc": 50.0})
    assert run.metric_extremum("val/acc", "maximum") == 55.0 and run.summary_metrics == {"test/acc": 50.0}
    assert sweep_run("b", "diverged", {}, [], None).state == "failed"


def test_claims_are_unique_and_complete_across_processes(tmp_path: Path) -> None:
    store = Store(tmp_path / "lenet.db")
    sweep_id = store.create_sweep(grid(activation=["relu", "tanh", "gelu"], seed=list(range(8))), seed=0)
    with get_context("spawn").Pool(4) as pool:
        claimed = sum(pool.starmap(claim_all, [(tmp_path / "lenet.db", sweep_id, f"w{i}") for i in range(4)]), [])
    assert len(claimed) == 24 and len(set(claimed)) == 24
    runs = store.runs(sweep_id)
    assert len({(r["params"]["activation"], r["params"]["seed"]) for r in runs}) == 24
    assert all(r["state"] == "finished" and r["attempts"] == 1 for r in runs)
    assert store.sweep(sweep_id)["state"] == "finished"


def claim_all(path: Path, sweep_id: str, worker: str) -> list[str]:
    """Claim and immediately finish runs until the sweep is done (module-level for spawn)."""
    store, got = Store(path), []
    while (claim := store.claim(sweep_id, worker)) is not None:
        if claim != WAIT:
            got.append(claim.run_id)
            store.finish(claim.run_id, "finished", {"best/val_acc": 1.0})
    return got


def test_dead_worker_run_is_requeued(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(tmp_path / "lenet.db")
    sweep_id = store.create_sweep(grid(seed=[0, 1]), seed=0)
    first = store.claim(sweep_id, "a")
    second = store.claim(sweep_id, "a")
    store.finish(second.run_id, "finished", {})
    assert store.claim(sweep_id, "b") == WAIT  # the first run is in flight and alive
    monkeypatch.setenv("LENET_HEARTBEAT_TIMEOUT", "0")
    again = store.claim(sweep_id, "b")
    assert again.run_id == first.run_id and again.attempt == 2 and again.params == first.params
    store.finish(again.run_id, "finished", {})
    assert store.claim(sweep_id, "b") is None


def test_a_lost_workers_runs_are_requeued_together(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(tmp_path / "lenet.db")
    sweep_id = store.create_sweep(grid(seed=[0, 1, 2]), seed=0)
    pack = store.claim_many(sweep_id, "a", 2)
    alive = store.claim(sweep_id, "c")
    monkeypatch.setenv("LENET_HEARTBEAT_TIMEOUT", "60")
    with store.transaction() as db:  # the worker died between its members' beats: only one of them is stale yet
        db.execute("UPDATE runs SET heartbeat_at = ? WHERE id = ?", (time.time() - 61, pack[0].run_id))
    again = store.claim_many(sweep_id, "b", 2)
    assert [c.run_id for c in again] == [c.run_id for c in pack] and {c.attempt for c in again} == {2}
    states = {r["id"]: r["state"] for r in store.runs(sweep_id)}
    assert states[alive.run_id] == "running"  # another worker's run is not touched
    assert store.heartbeat(*[c.run_id for c in again]) and store.claim(sweep_id, "d") == WAIT


def test_run_cap_retry_failed_and_stop(tmp_path: Path) -> None:
    store = Store(tmp_path / "lenet.db")
    config = {
        "method": "random",
        "run_cap": 3,
        "parameters": {"lr": {"distribution": "uniform", "min": 0.01, "max": 0.1}},
    }
    sweep_id = store.create_sweep(config, seed=0)
    ids = []
    while (claim := store.claim(sweep_id, "w")) is not None:
        ids.append(claim.run_id)
        store.finish(claim.run_id, "failed" if len(ids) == 2 else "finished", error="boom")
    assert len(ids) == 3
    assert store.retry_failed(sweep_id) == 1
    retry = store.claim(sweep_id, "w")
    assert retry.run_id == ids[1] and retry.attempt == 1  # a retry starts afresh, not from its checkpoint
    store.set_sweep_state(sweep_id, "stopped")
    assert store.claim(sweep_id, "w") is None


def test_hyperband_stops_a_run_that_falls_behind(tmp_path: Path) -> None:
    store = Store(tmp_path / "lenet.db")
    config = {**grid(seed=[0, 1, 2]), "early_terminate": {"type": "hyperband", "min_iter": 2, "eta": 2}}
    sweep_id = store.create_sweep(config, seed=0)
    good, better, bad = (store.claim(sweep_id, "w") for _ in range(3))
    for epoch, values in enumerate([(50.0, 52.0, 20.0), (60.0, 55.0, 21.0)], start=1):
        for claim, value in zip((good, better, bad), values):
            store.log_epoch(claim.run_id, epoch, {"val/acc": value})
    store.finish(good.run_id, "finished", {})
    assert not store.should_stop(better.run_id)
    assert store.should_stop(bad.run_id)


def test_unknown_sweep_and_corrupt_store(tmp_path: Path) -> None:
    store = Store(tmp_path / "lenet.db")
    with pytest.raises(SweepError, match="unknown sweep id 'nope'"):
        store.claim("nope", "w")
    (tmp_path / "bad.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="bad.db is not a SQLite file"):
        Store(tmp_path / "bad.db")


def write_smoke(tmp_path: Path, data_dir: Path, **values) -> Path:
    """sweeps/smoke.yaml pointed at tiny data (the test adds settings as constant parameters)."""
    original = (ROOT / "sweeps" / "smoke.yaml").read_text()
    config = yaml.safe_load(original)
    extra = {"data": "folder", "data_dir": str(data_dir), "val_size": 20, "batch_size": 32, "device": "cpu", **values}
    config["parameters"].update({k: {"value": v} for k, v in extra.items()})
    path = tmp_path / "smoke.yaml"
    path.write_text(original.splitlines()[0] + "\n" + yaml.safe_dump(config))  # keep the question comment
    return path


def test_claim_many_claims_one_pack_at_a_time_and_leaves_the_rest_pending(tmp_path: Path) -> None:
    store = Store(tmp_path / "lenet.db")
    sweep_id = store.create_sweep(grid(activation=["relu", "tanh"], seed=[0, 1, 2]), seed=0)
    activation = lambda claim: claim.params["activation"]  # noqa: E731  (the agent's key: pack_key and epoch)
    packs = []
    while isinstance(claims := store.claim_many(sweep_id, "w", 4, key=activation), list):
        assert len({activation(c) for c in claims}) == 1 and 1 <= len(claims) <= 4
        packs.append([c.run_id for c in claims])
        for claim in claims:
            store.finish(claim.run_id, "finished", {})
    claimed = [run_id for pack in packs for run_id in pack]
    assert sorted(claimed) == sorted(r["id"] for r in store.runs(sweep_id)) and len(claimed) == 6  # each once
    assert len(packs) < 6  # runs were claimed together
    assert all(r["attempts"] == 1 for r in store.runs(sweep_id))


def test_a_requeued_run_with_a_damaged_last_pt_is_claimed_alone(tmp_path: Path) -> None:
    store = Store(tmp_path / "lenet.db")
    sweep_id = store.create_sweep(grid(seed=[0, 1, 2]), seed=0)
    first = store.claim(sweep_id, "w")
    assert isinstance(first, Claim)
    store.requeue(first.run_id, "worker stopped")
    (tmp_path / "runs" / first.run_id).mkdir(parents=True)
    (tmp_path / "runs" / first.run_id / "last.pt").write_bytes(b"torn")  # e.g. a disk error
    spec = WorkerSpec((sweep_id,), "w", tmp_path / "lenet.db", fuse=4, home=tmp_path)
    key = functools.partial(pack_of, spec=spec, store=store)
    claims = store.claim_many(sweep_id, "w", 4, key=key)  # the agent's claim: no error, no partners
    assert isinstance(claims, list) and [c.run_id for c in claims] == [first.run_id] and claims[0].attempt == 2
    assert len(store.claim_many(sweep_id, "w", 4, key=key)) == 2  # the fresh runs still pack together


HYPERBANDS = [
    {"type": "hyperband", "min_iter": 2, "eta": 2},
    {"type": "hyperband", "min_iter": 3, "eta": 3, "strict": True},
    {"type": "hyperband", "max_iter": 27, "s": 3, "eta": 3},
]


@pytest.mark.parametrize("goal", ["maximize", "minimize"])
@pytest.mark.parametrize("early_terminate", HYPERBANDS, ids=["min_iter", "strict", "max_iter"])
def test_hyperband_from_indexed_rungs_decides_as_the_sweeps_engine(
    tmp_path: Path, goal: str, early_terminate: dict
) -> None:
    rng = random.Random(f"{goal}{early_terminate}")
    store = Store(tmp_path / "lenet.db")
    config = {**grid(seed=list(range(60))), "metric": {"name": "val/acc", "goal": goal}}
    sweep_id = store.create_sweep({**config, "early_terminate": early_terminate}, seed=0)
    for claim in store.claim_many(sweep_id, "w", 60):
        quality = rng.gauss(50, 10)
        epochs = rng.randint(0, 14)
        for epoch in range(1, epochs + 1):  # NaN epochs (a diverging run) do not count as positions
            value = quality + epoch + rng.gauss(0, 2) if rng.random() > 0.1 else math.nan
            store.log_epoch(claim.run_id, epoch, {"val/acc": value})
        if rng.random() < 0.1 and epochs > 1:  # a resumed run logs its last epoch again
            store.log_epoch(claim.run_id, epochs, store.history(claim.run_id)[-1])
        if rng.random() < 0.3:
            store.finish(claim.run_id, "finished" if rng.random() < 0.5 else "failed", {})
    runs = store.runs(sweep_id)
    engine_runs = [sweep_run(r["id"], r["state"], r["params"], store.history(r["id"]), r["summary"]) for r in runs]
    expected = to_stop({**config, "early_terminate": early_terminate}, engine_runs)
    running = [r["id"] for r in runs if r["state"] == "running"]
    assert 0 < len(expected) < len(running)  # the case decides something
    assert {run_id for run_id in running if store.should_stop(run_id)} == expected


def test_a_grid_is_claimed_in_the_order_the_engine_hands_it_out_one_by_one(tmp_path: Path) -> None:
    config = grid(activation=["relu", "tanh", "gelu"], seed=[0, 1], lr=[0.1, 0.01])
    one_by_one: list[dict] = []
    while params := suggest(config, [sweep_run(str(i), "finished", p, [], {}) for i, p in enumerate(one_by_one)], 0):
        one_by_one.append(params)
    store = Store(tmp_path / "lenet.db")
    sweep_id = store.create_sweep(config, seed=0)
    claimed = []
    while isinstance(claim := store.claim(sweep_id, "w"), Claim):
        claimed.append(claim.params)
        store.finish(claim.run_id, "finished", {})
    assert claimed == one_by_one and len(claimed) == 12
