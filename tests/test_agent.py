"""`lenet sweep` and `lenet agent` end to end: real processes, real training, a real kill -9."""

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import lenet
from test_sweep import ROOT, grid, write_smoke

from ablation.agent import Heartbeat, wandb_sweep_function
from ablation.store import WAIT, Store


def create(path: Path) -> str:
    result = lenet("sweep", "create", path, "--backend", "local", "--seed", "0")
    assert result.exit_code == 0, result.output
    return result.output.split("created sweep ")[1].split()[0]


def spawn_agent(sweep_id: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "cli.py"), "agent", sweep_id, "--wandb", "disabled", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for_running(store: Store, sweep_id: str, min_epochs: int, timeout: float = 180) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for run in store.runs(sweep_id):
            if run["state"] == "running" and len(store.history(run["id"])) >= min_epochs:
                return run
        time.sleep(0.1)
    raise AssertionError("no run got going")


@pytest.mark.slow
def test_two_agents_and_a_kill_9(folder_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LENET_HEARTBEAT_TIMEOUT", "3")
    sweep_id = create(write_smoke(tmp_path, folder_dir, epochs=10, batch_size=16))
    store = Store(Path(os.environ["LENET_HOME"]) / "lenet.db")
    victim = spawn_agent(sweep_id)
    killed = wait_for_running(store, sweep_id, min_epochs=2)
    assert killed["pid"] == victim.pid
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    agents = [spawn_agent(sweep_id), spawn_agent(sweep_id)]  # two concurrent agents finish the sweep
    outputs = [agent.communicate(timeout=480)[0] for agent in agents]  # ~60 s on 2 idle cores; CI may be busy
    assert all(agent.returncode == 0 for agent in agents), outputs
    runs = store.runs(sweep_id)
    assert len(runs) == 4 and all(r["state"] == "finished" for r in runs)
    assert len({(r["params"]["activation"], r["params"]["seed"]) for r in runs}) == 4  # each grid point once
    resumed = next(r for r in runs if r["id"] == killed["id"])
    assert resumed["attempts"] == 2 and resumed["summary"]["epochs_run"] == 10
    assert [h["epoch"] for h in store.history(killed["id"])] == list(range(1, 11))
    assert "resuming" in "".join(outputs)
    status = lenet("sweep", "status", sweep_id)
    assert status.exit_code == 0 and "4 finished" in status.output and "best so far" in status.output


def test_local_runs_are_wandb_offline_runs(folder_dir: Path, tmp_path: Path) -> None:
    sweep_id = create(write_smoke(tmp_path, folder_dir, epochs=1))
    result = lenet("agent", sweep_id, "--count", "2", "--wandb", "offline")
    assert result.exit_code == 0, result.output
    offline = sorted(p.name for p in (Path(os.environ["LENET_HOME"]) / "wandb").glob("offline-run-*"))
    assert [name[-len(sweep_id) - 4 :] for name in offline] == [f"{sweep_id}-000", f"{sweep_id}-001"]
    assert "2 finished" in lenet("sweep", "status", sweep_id).output


def test_agent_finishes_a_sweep_and_status_reports_it(folder_dir: Path, tmp_path: Path) -> None:
    sweep_id = create(write_smoke(tmp_path, folder_dir, epochs=2))
    assert "0/4" in lenet("sweep", "ls").output  # the grid's runs, though none is created before it is claimed
    result = lenet("agent", sweep_id, "--wandb", "disabled")
    assert result.exit_code == 0, result.output
    assert f"sweep {sweep_id}: 4 finished, 0 failed" in result.output
    listed = lenet("sweep", "ls")
    assert sweep_id in listed.output and "4/4" in listed.output
    status = lenet("sweep", "status", sweep_id)
    assert "4 finished" in status.output and "activation=tanh seed=1" in status.output


def test_status_estimates_the_time_left_from_epoch_times_not_from_gaps_between_sessions(
    folder_dir: Path, tmp_path: Path
) -> None:
    sweep_id = create(write_smoke(tmp_path, folder_dir, epochs=1))
    assert lenet("agent", sweep_id, "--count", "2", "--wandb", "disabled").exit_code == 0
    store = Store(Path(os.environ["LENET_HOME"]) / "lenet.db")
    with sqlite3.connect(store.path) as db:  # as if both were started a day ago, then resumed after a session ended
        db.execute("UPDATE runs SET started_at = started_at - 86400 WHERE state = 'finished'")
    status = lenet("sweep", "status", sweep_id).output
    minutes = float(status.split("about ")[1].split(" min remaining (2 runs")[0])
    assert minutes < 5  # two 1-epoch runs on the tiny data: seconds each, not the days in between (2880 min)


def test_one_agent_serves_several_sweeps_in_priority_order(folder_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = create(write_smoke(tmp_path / "a", folder_dir, epochs=1))
    second = create(write_smoke(tmp_path / "b", folder_dir, epochs=1, lr=0.01))
    unknown = lenet("agent", first, "nosuchid", "--wandb", "disabled")
    assert unknown.exit_code == 1 and "unknown sweep id 'nosuchid'" in unknown.output
    result = lenet("agent", first, second, first, "--wandb", "disabled")  # a repeated id is served once
    assert result.exit_code == 0, result.output
    assert result.output.count(f"sweep {first}: 4 finished") == 1 and f"sweep {second}: 4 finished" in result.output
    store = Store(Path(os.environ["LENET_HOME"]) / "lenet.db")
    last_of_first = max(r["started_at"] for r in store.runs(first))
    assert all(r["started_at"] > last_of_first for r in store.runs(second))  # the first sweep is served first


def test_confirm_retrains_the_best_variant_over_seeds(folder_dir: Path, tmp_path: Path) -> None:
    sweep_id = create(write_smoke(tmp_path, folder_dir, epochs=2))
    assert lenet("agent", sweep_id, "--wandb", "disabled").exit_code == 0
    runs = Store(Path(os.environ["LENET_HOME"]) / "lenet.db").runs(sweep_id)
    mean = lambda act: sum(r["summary"]["best/val_acc"] for r in runs if r["params"]["activation"] == act) / 2
    best = max({r["params"]["activation"] for r in runs}, key=mean)  # grid: the best mean over seeds wins
    out = tmp_path / "new" / "confirm.yaml"
    result = lenet("sweep", "confirm", sweep_id, out, "--epochs", "3", "--seeds", "2")
    assert (
        result.exit_code == 0 and f"activation={best}: mean best/val_acc {mean(best):.2f} over 2 runs" in result.output
    ), result.output
    assert out.read_text().startswith(f"# Question: does the best of sweep smoke (activation={best}")
    confirm_id = create(out)
    assert lenet("agent", confirm_id, "--wandb", "disabled").exit_code == 0
    confirmed = Store(Path(os.environ["LENET_HOME"]) / "lenet.db").runs(confirm_id)
    assert sorted(r["params"]["seed"] for r in confirmed) == [0, 1]
    for run in confirmed:
        assert run["params"]["activation"] == best and run["params"]["epochs"] == 3
        assert run["state"] == "finished" and run["summary"]["epochs_run"] == 3
    from analysis.results import from_store, merge, write_bundle

    store = Store(Path(os.environ["LENET_HOME"]) / "lenet.db")
    write_bundle(merge([from_store(store, sweep_id), from_store(store, confirm_id)]), tmp_path / "both.json")
    two = lenet("sweep", "confirm", tmp_path / "both.json", tmp_path / "again.yaml", "--epochs", "4")
    assert two.exit_code == 2 and "holds 2 sweeps" in two.output and not (tmp_path / "again.yaml").exists()


def test_confirm_needs_finished_runs(folder_dir: Path, tmp_path: Path) -> None:
    sweep_id = create(write_smoke(tmp_path, folder_dir, epochs=2))
    result = lenet("sweep", "confirm", sweep_id, tmp_path / "c.yaml", "--epochs", "3")
    assert result.exit_code == 1 and "no finished run" in result.output and not (tmp_path / "c.yaml").exists()


def test_failed_runs_are_recorded_and_retried(folder_dir: Path, tmp_path: Path) -> None:
    path = write_smoke(tmp_path, folder_dir, epochs=1)
    sweep_id = create(path)
    (folder_dir / "test").rename(folder_dir / "moved")  # every run now fails on its data
    result = lenet("agent", sweep_id, "--wandb", "disabled")
    assert result.exit_code == 0 and "4 failed/diverged" in result.output and "--retry-failed" in result.output
    assert "no image folder" in Store(Path(os.environ["LENET_HOME"]) / "lenet.db").runs(sweep_id)[0]["error"]
    (folder_dir / "moved").rename(folder_dir / "test")
    retried = lenet("agent", sweep_id, "--retry-failed", "--wandb", "disabled")
    assert "requeued 4 failed run(s)" in retried.output and "4 finished, 0 failed" in retried.output


def test_sweep_stop(folder_dir: Path, tmp_path: Path) -> None:
    sweep_id = create(write_smoke(tmp_path, folder_dir, epochs=1))
    assert lenet("sweep", "stop", sweep_id).exit_code == 0
    result = lenet("agent", sweep_id, "--wandb", "disabled")
    assert "0 finished" in result.output


BAD_SWEEPS = {
    "malformed YAML": ("method: grid\nparameters: {lr: [0.1\n", "not valid YAML"),
    "unknown method": ("method: hill\nparameters: {lr: {values: [0.1]}}\n", "method 'hill' is not supported"),
    "unknown parameter": (
        "method: grid\nparameters: {activaton: {values: [relu]}}\n",
        "unknown parameter 'activaton' (did you mean 'activation'?)",
    ),
    "invalid value": (
        "method: grid\nparameters: {optimizer: {values: [sgd, lion]}}\n",
        "optimizer='lion' is not valid",
    ),
    "empty grid": ("method: grid\nparameters: {lr: {values: []}}\n", "empty values list"),
    "values that clash": (
        "method: grid\nparameters: {teacher_logits: {values: [online, precomputed]}, cutout: {values: [0, 8]}}\n",
        "1 of 4 parameter combinations fail (teacher_logits=precomputed cutout=8): teacher_logits=precomputed holds",
    ),
}


@pytest.mark.parametrize("case", BAD_SWEEPS, ids=list(BAD_SWEEPS))
def test_bad_sweep_files_create_nothing(case: str, tmp_path: Path) -> None:
    text, message = BAD_SWEEPS[case]
    (tmp_path / "bad.yaml").write_text(text)
    result = lenet("sweep", "create", tmp_path / "bad.yaml", "--backend", "local")
    assert result.exit_code == 1 and message in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert Store().sweeps() == []


def test_unknown_sweep_id_and_corrupt_store(tmp_path: Path) -> None:
    result = lenet("agent", "nosuchid")  # no store yet: none is created
    assert result.exit_code == 1 and "no sweep store at" in result.output
    Store().close()  # an empty store
    result = lenet("agent", "nosuchid")
    assert result.exit_code == 1 and "unknown sweep id 'nosuchid'" in result.output
    assert lenet("sweep", "status", "nosuchid").exit_code == 1
    db = Path(os.environ["LENET_HOME"]) / "lenet.db"
    for sidecar in db.parent.glob("lenet.db-*"):  # WAL files: a copied or damaged store often lacks them
        sidecar.unlink()
    db.write_bytes(b"garbage" * 1000)
    result = lenet("sweep", "ls")
    assert result.exit_code == 1 and "lenet.db is not a SQLite file" in result.output


def test_wandb_backend_without_login_creates_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    result = lenet("sweep", "create", ROOT / "sweeps" / "smoke.yaml", "--backend", "wandb")
    assert result.exit_code == 1 and "W&B could not create the sweep" in result.output
    assert Store().sweeps() == []


def test_wandb_agent_training_function_offline(folder_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    summary = wandb_sweep_function(
        {
            "data_dir": str(folder_dir),
            "val_size": 20,
            "batch_size": 32,
            "epochs": 1,
            "activation": "tanh",
            "device": "cpu",
        }
    )
    assert summary["state"] == "finished" and summary["dataset"] == "tiny-png"
    (run_dir,) = (Path(os.environ["WANDB_DIR"]) / "wandb").glob("offline-run-*")
    (log,) = run_dir.glob("run-*.wandb")  # protobuf records: config keys and JSON values appear as text
    needles = (b"activation", b'"tanh"', b"weight_decay", b"test/acc")
    deadline = time.time() + 60  # wandb-core may still be flushing the file when finish() returns
    while not all(n in log.read_bytes() for n in needles) and time.time() < deadline:
        time.sleep(0.5)
    assert all(n in log.read_bytes() for n in needles), log.read_bytes()[:200]


def test_workers_split_cores_or_take_gpus_round_robin(tmp_path: Path) -> None:
    from ablation.agent import plan_workers

    cores = len(os.sched_getaffinity(0))
    cpu = plan_workers(["s"], tmp_path / "lenet.db", 2, [], None, "disabled")
    assert [w.threads for w in cpu] == [max(1, cores // 2)] * 2 and all(w.gpu is None for w in cpu)
    gpu = plan_workers(["s", "t"], tmp_path / "lenet.db", 3, ["0", "1"], 5, "offline")
    assert [w.gpu for w in gpu] == ["0", "1", "0"] and all(w.count == 5 for w in gpu)
    assert all(w.sweep_ids == ("s", "t") and w.threads == max(1, cores // 3) for w in gpu)
    assert len({w.name for w in gpu}) == 3


def test_more_pack_workers_than_a_gpu_serves_are_flagged(tmp_path: Path) -> None:
    from ablation.agent import PACK_WORKERS_PER_GPU, crowded_gpus, plan_workers

    n = PACK_WORKERS_PER_GPU + 1
    plan = lambda gpus, fuse: plan_workers(["s"], tmp_path / "lenet.db", len(gpus) or n, gpus, None, "disabled", fuse)  # noqa: E731
    assert crowded_gpus(plan(["0"] * n + ["1"], 64)) == {"0": n}  # GPU 1's one worker is fine
    assert crowded_gpus(plan(["0"] * PACK_WORKERS_PER_GPU, 64)) == {}
    assert crowded_gpus(plan(["0"] * n, 1)) == {}  # one-run workers: the many-processes recipe of docs/benchmarks.md
    assert crowded_gpus(plan([], 64), cuda=False) == {}  # --fuse on a CPU machine: no GPU to crowd
    assert crowded_gpus(plan([], 64), cuda=True) == {"": n}  # no --gpus: all on the one visible GPU


SAME_IN_A_PACK = ("state", "epochs_run", "best_epoch", "best/val_acc", "test/acc")


def test_fused_agent_trains_compatible_runs_as_packs(folder_dir: Path, tmp_path: Path) -> None:
    path = write_smoke(tmp_path, folder_dir, epochs=2, threads=1)  # relu and tanh runs: two packs of two
    fused_sweep, alone_sweep = create(path), create(path)
    result = lenet("agent", fused_sweep, "--fuse", "4", "--wandb", "offline")
    assert result.exit_code == 0, result.output
    assert "packs of up to 4 runs" in result.output and f"sweep {fused_sweep}: 4 finished" in result.output
    assert lenet("agent", alone_sweep, "--wandb", "disabled").exit_code == 0  # CPU default: one run at a time
    home = Path(os.environ["LENET_HOME"])
    store = Store(home / "lenet.db")
    alone = {(r["params"]["activation"], r["params"]["seed"]): r["summary"] for r in store.runs(alone_sweep)}
    for run in store.runs(fused_sweep):
        summary = run["summary"]
        assert summary["pack_size"] == 2 and [h["epoch"] for h in store.history(run["id"])] == [1, 2]
        twin = alone[run["params"]["activation"], run["params"]["seed"]]
        assert {k: summary[k] for k in SAME_IN_A_PACK} == {k: twin[k] for k in SAME_IN_A_PACK}
        tested = lenet("test", home / "runs" / run["id"] / "best.pt", "--device", "cpu")
        assert tested.exit_code == 0 and f"{summary['test/acc']:.2f}" in tested.output
    offline = sorted(p.name[-len(fused_sweep) - 4 :] for p in (home / "wandb").glob("offline-run-*"))
    assert offline == [f"{fused_sweep}-00{i}" for i in range(4)]  # each member is its own W&B run


@pytest.mark.slow
def test_a_killed_pack_resumes_every_member_exactly(
    folder_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LENET_HEARTBEAT_TIMEOUT", "3")
    path = write_smoke(tmp_path, folder_dir, epochs=10, batch_size=16, activation="relu", threads=1)  # one pack
    killed_sweep, whole_sweep = create(path), create(path)
    store = Store(Path(os.environ["LENET_HOME"]) / "lenet.db")
    victim = spawn_agent(killed_sweep, "--fuse", "2")
    wait_for_running(store, killed_sweep, min_epochs=3)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    output = spawn_agent(killed_sweep, "--fuse", "2").communicate(timeout=240)[0]
    assert "resuming" in output and f"sweep {killed_sweep}: 2 finished" in output, output
    assert lenet("agent", whole_sweep, "--fuse", "2", "--wandb", "disabled").exit_code == 0
    whole = {r["params"]["seed"]: r for r in store.runs(whole_sweep)}
    for run in store.runs(killed_sweep):
        twin = whole[run["params"]["seed"]]
        assert run["attempts"] == 2 and run["summary"].get("pack_size") == 2, (output, store.runs(killed_sweep))
        history, twin_history = store.history(run["id"]), store.history(twin["id"])
        assert [h["epoch"] for h in history] == list(range(1, 11))
        assert timeless(history) == timeless(twin_history)  # bit for bit
        assert run["summary"]["test/acc"] == twin["summary"]["test/acc"]


def timeless(history: list[dict]) -> list[dict]:
    """Stored epochs without the wall-clock metrics."""
    return [{k: v for k, v in h.items() if not k.startswith(("time/", "throughput/"))} for h in history]


def test_the_heartbeat_thread_keeps_a_pack_alive_between_epochs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LENET_HEARTBEAT_TIMEOUT", "0.4")  # a beat every 0.1 s
    store = Store(tmp_path / "lenet.db")
    sweep_id = store.create_sweep(grid(seed=[0, 1]), seed=0)
    claims = store.claim_many(sweep_id, "w", 2)
    before = {r["id"]: r["heartbeat_at"] for r in store.runs(sweep_id)}
    with Heartbeat(store.path, *(c.run_id for c in claims)):
        time.sleep(1.0)  # longer than the timeout: without beats the next claim would requeue them
    assert all(r["heartbeat_at"] > before[r["id"]] + 0.5 for r in store.runs(sweep_id))
    assert store.claim(sweep_id, "other") == WAIT  # still theirs
