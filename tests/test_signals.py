"""Signals and full disks, with real processes: what SIGTERM, Ctrl-C, kill -9 and a full disk leave behind.

`lenet train` stopped by SIGTERM or Ctrl-C ends its run as `stopped` (summary, W&B run finished) and then dies
by that signal (a shell reports 143 or 130; Python's Popen -15 or -2). An agent stopped so requeues every run
its workers hold, says how many on one line, and leaves no worker behind; a worker killed with -9 is replaced
and its run requeued at once. A full disk is one line, the run requeued, no temporary file left."""

import ctypes
import glob
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import TINY
from test_agent import create, lenet
from test_sweep import ROOT, write_smoke

from ablation.agent import INTERRUPTED, wandb_sweep_function
from ablation.signals import StopRequest, StopSignal
from ablation.store import Store

TINY_ARGS = [f"{k}={v}" for k, v in TINY.items()]
METRICS = ("train/loss", "train/acc", "val/loss", "val/acc")


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen]]:
    """Processes a test starts; whatever is still alive at the end is killed with its whole group."""
    procs: list[subprocess.Popen] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def start(started: list[subprocess.Popen], *args: Any) -> subprocess.Popen:
    """`lenet ARGS` as a real process leading its own process group, as a terminal's job does (Ctrl-C: killpg)."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "cli.py"), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    started.append(proc)
    return proc


def until(condition: Callable[[], Any], what: str, timeout: float = 90) -> Any:
    """Poll `condition` until it returns something truthy (returned), or fail after `timeout` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def alive(pid: int) -> bool:
    """True while process `pid` exists and is not a zombie (Linux)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def workers_of(pid: int) -> list[int]:
    """The worker processes (multiprocessing spawn children) of agent `pid` (Linux)."""

    def cmdline(child: str) -> bytes:
        try:
            return Path(f"/proc/{child}/cmdline").read_bytes()
        except FileNotFoundError:  # a short-lived child that has exited
            return b""

    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children if b"spawn_main" in cmdline(c)]


def running(store: Store, sweep_id: str, min_epochs: int = 1) -> list[dict]:
    """The sweep's runs in progress that have logged at least `min_epochs` epochs."""
    return [r for r in store.runs(sweep_id) if r["state"] == "running" and len(store.history(r["id"])) >= min_epochs]


def home_store() -> Store:
    return Store(Path(os.environ["LENET_HOME"]) / "lenet.db")


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


# ---- the mechanism -------------------------------------------------------------------------------------------


def test_stop_request_raises_once_and_only_flags_while_deferred() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with StopRequest(raise_in_main=True) as stop:
        with stop.deferred():  # training: the flag alone, polled every batch
            os.kill(os.getpid(), signal.SIGTERM)
            until(stop, "the flag")
        assert stop.signum == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGINT)  # a second signal is ignored: clean-up is not cut short
        time.sleep(0.2)
    with pytest.raises(StopSignal), StopRequest(raise_in_main=True):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # interrupted at once
    assert signal.getsignal(signal.SIGTERM) is before  # handlers are restored


# ---- lenet train -------------------------------------------------------------------------------------------


def start_long_train(started: list, data_dir: Path, out: Path, wandb: str) -> subprocess.Popen:
    """`lenet train` of a 1000-epoch run on tiny data, returned once its first epoch is checkpointed."""
    proc = start(
        started, "train", *TINY_ARGS, "epochs=1000", "batch_size=16", f"data_dir={data_dir}",
        "--wandb", wandb, "--out", out,
    )  # fmt: skip
    until(lambda: list(out.glob("*/last.pt")), "the first epoch")
    return proc


def test_sigterm_stops_lenet_train_and_keeps_its_offline_wandb_run(
    folder_dir: Path, tmp_path: Path, started: list
) -> None:
    out = tmp_path / "runs"
    proc = start_long_train(started, folder_dir, out, "offline")
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert time.time() - sent < 30, "a stop is prompt (W&B's agent kills a stopped run after a delay)"
    assert proc.returncode == -signal.SIGTERM, (stdout, stderr)  # died by SIGTERM after cleaning up: 143 in a shell
    (run_dir,) = out.iterdir()
    (line,) = errors(stderr)
    assert line.startswith("error: stopped by SIGTERM after ") and f"checkpoints: {run_dir}/best.pt, last.pt" in line
    assert "stopped" in stdout and "test/acc" in stdout and "Traceback" not in stdout + stderr  # the summary
    (log,) = glob.glob(str(tmp_path / "wandb" / "wandb" / "offline-run-*" / "run-*.wandb"))
    needles = (b"train/loss", b"val/acc", b"test/acc", b"best/val_acc", b'"stopped"')  # history and summary
    until(lambda: all(n in Path(log).read_bytes() for n in needles), "wandb-core to flush the run", timeout=60)


def test_ctrl_c_stops_lenet_train_cleanly(folder_dir: Path, tmp_path: Path, started: list) -> None:
    out = tmp_path / "runs"
    proc = start_long_train(started, folder_dir, out, "disabled")
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGINT, (stdout, stderr)
    (line,) = errors(stderr)
    assert line.startswith("error: stopped by SIGINT") and "Traceback" not in stdout + stderr
    assert "│ state" in stdout and "stopped" in stdout


def test_a_diverged_run_lists_only_the_checkpoints_it_wrote(batches_dir: Path, tmp_path: Path) -> None:
    result = lenet(
        "train", *TINY_ARGS, f"data_dir={batches_dir}", "preset=classic", "activation=relu", "lr=1e8",
        "batch_size=8", "epochs=2", "--wandb", "disabled", "--out", tmp_path / "r",
    )  # fmt: skip
    assert result.exit_code == 1 and "diverged" in result.output
    (run_dir,) = (tmp_path / "r").iterdir()
    assert [p.name for p in run_dir.iterdir()] == ["last.pt"]  # no epoch was ever the best: no best.pt
    assert "last.pt" in result.output and "best.pt" not in result.output


def test_a_stop_from_wandbs_agent_ends_the_run_as_stopped(folder_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """W&B's agent (wandb.agent, hyperband) runs the function in a thread and stops it by raising Exception in
    that thread (PyThreadState_SetAsyncExc); the run still ends with its summary and test metrics."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    outcome: dict[str, Any] = {}
    settings = {**TINY, "epochs": 1000, "batch_size": 16, "data_dir": str(folder_dir)}
    thread = threading.Thread(target=lambda: outcome.update(wandb_sweep_function(settings)))
    thread.start()
    until(lambda: glob.glob(os.path.join(os.environ["LENET_HOME"], "runs", "*", "last.pt")), "the first epoch")
    assert ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(Exception))
    thread.join(timeout=60)
    assert not thread.is_alive() and outcome["state"] == "stopped" and outcome["epochs_run"] >= 1
    assert outcome["test/acc"] == outcome["test/acc"]  # not NaN: the best epoch's weights were evaluated
    (log,) = glob.glob(os.path.join(os.environ["WANDB_DIR"], "wandb", "offline-run-*", "run-*.wandb"))
    until(lambda: b'"stopped"' in Path(log).read_bytes(), "wandb-core to flush the run", timeout=60)


# ---- lenet agent -------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "signum, target",
    [(signal.SIGTERM, "pid"), (signal.SIGINT, "pid"), (signal.SIGINT, "group")],
    ids=["SIGTERM", "SIGINT-to-the-agent-only", "Ctrl-C"],
)
def test_a_stopped_agent_stops_its_workers_and_requeues_their_runs(
    signum: int, target: str, folder_dir: Path, tmp_path: Path, started: list
) -> None:
    sweep_id = create(write_smoke(tmp_path, folder_dir, epochs=1000, batch_size=16))
    store = home_store()
    agent = start(started, "agent", sweep_id, "--workers", "2", "--wandb", "disabled")
    held = until(lambda: len(running(store, sweep_id)) == 2 and running(store, sweep_id), "two runs in progress")
    (os.killpg if target == "group" else os.kill)(agent.pid, signum)
    stdout, stderr = agent.communicate(timeout=120)
    assert agent.returncode == -signum, (stdout, stderr)
    name = signal.Signals(signum).name
    assert errors(stderr) == [f"error: interrupted ({name}): 2 run(s) requeued; they resume from their last checkpoint"]
    assert "Traceback" not in stdout + stderr
    until(lambda: not any(alive(run["pid"]) for run in held), "the workers to exit", timeout=10)
    runs = {r["id"]: r for r in store.runs(sweep_id)}
    for run in held:
        assert runs[run["id"]]["state"] == "pending" and runs[run["id"]]["error"] == INTERRUPTED
        assert (Path(os.environ["LENET_HOME"]) / "runs" / run["id"] / "last.pt").exists()
    assert not [r for r in runs.values() if r["state"] == "running"]


def test_an_agent_stopped_before_its_workers_claimed_anything_requeues_none(
    folder_dir: Path, tmp_path: Path, started: list
) -> None:
    sweep_id = create(write_smoke(tmp_path, folder_dir, epochs=1000, batch_size=16))
    agent = start(started, "agent", sweep_id, "--workers", "2", "--wandb", "disabled")
    until(lambda: workers_of(agent.pid), "the workers to start")  # they take seconds to import torch
    agent.send_signal(signal.SIGTERM)
    stdout, stderr = agent.communicate(timeout=120)
    assert agent.returncode == -signal.SIGTERM, (stdout, stderr)
    assert errors(stderr) == ["error: interrupted (SIGTERM): 0 run(s) requeued"]
    assert "Traceback" not in stdout + stderr
    assert all(r["state"] == "pending" for r in home_store().runs(sweep_id))


@pytest.mark.slow
def test_workers_do_not_outlive_an_agent_killed_with_sigkill(folder_dir: Path, tmp_path: Path, started: list) -> None:
    sweep_id = create(write_smoke(tmp_path, folder_dir, epochs=1000, batch_size=16))
    store = home_store()
    agent = start(started, "agent", sweep_id, "--workers", "2", "--wandb", "disabled")
    held = until(lambda: len(running(store, sweep_id)) == 2 and running(store, sweep_id), "two runs in progress")
    agent.kill()
    until(lambda: not any(alive(run["pid"]) for run in held), "the orphaned workers to stop", timeout=60)
    stdout, stderr = agent.communicate(timeout=60)
    assert "Traceback" not in stdout + stderr
    assert {r["id"]: (r["state"], r["error"]) for r in store.runs(sweep_id) if r["id"] in {h["id"] for h in held}} == {
        run["id"]: ("pending", INTERRUPTED) for run in held
    }  # each worker noticed its agent was gone and requeued its run itself


def test_workers_of_an_agent_killed_during_their_start_up_exit_and_claim_nothing(
    folder_dir: Path, tmp_path: Path, started: list
) -> None:
    sweep_id = create(write_smoke(tmp_path, folder_dir, epochs=1000, batch_size=16))
    agent = start(started, "agent", sweep_id, "--workers", "2", "--wandb", "disabled")
    workers = until(lambda: len(workers_of(agent.pid)) == 2 and workers_of(agent.pid), "the two workers to exist")
    agent.kill()  # while they still import torch: by the time they look, their parent is already init
    agent.communicate(timeout=60)
    until(lambda: not any(alive(pid) for pid in workers), "the orphaned workers to exit", timeout=60)
    runs = home_store().runs(sweep_id)
    assert [r["id"] for r in runs if r["state"] != "pending" or r["worker"]] == []  # nothing claimed or trained


@pytest.mark.slow
def test_a_killed_worker_is_replaced_and_its_run_requeued_at_once(
    folder_dir: Path, tmp_path: Path, started: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LENET_HEARTBEAT_TIMEOUT", "3600")  # so only the agent can have requeued the run
    sweep_id = create(write_smoke(tmp_path, folder_dir, epochs=1000, batch_size=16))
    store = home_store()
    agent = start(started, "agent", sweep_id, "--workers", "2", "--wandb", "disabled")
    victim = until(lambda: len(running(store, sweep_id)) == 2 and running(store, sweep_id)[0], "two runs in progress")
    os.kill(victim["pid"], signal.SIGKILL)
    epochs = len(store.history(victim["id"]))

    def resumed() -> dict | None:  # and trained an epoch more: its start line was printed before it
        run = next(r for r in store.runs(sweep_id) if r["id"] == victim["id"])
        trained = len(store.history(victim["id"])) > epochs
        return run if run["state"] == "running" and run["pid"] != victim["pid"] and trained else None

    again = until(resumed, "a replacement worker to resume the run")
    assert again["attempts"] == victim["attempts"] + 1 and alive(again["pid"])
    agent.send_signal(signal.SIGTERM)
    stdout, stderr = agent.communicate(timeout=120)
    assert f"died (exit code -9); requeued {victim['id']}; started replacement 1/3" in stdout
    assert f"start {victim['id']} (attempt 2, resuming)" in stdout
    assert errors(stderr) == ["error: interrupted (SIGTERM): 2 run(s) requeued; they resume from their last checkpoint"]


def test_sigterm_to_a_one_worker_agent_requeues_and_the_run_resumes_exactly(
    folder_dir: Path, tmp_path: Path, started: list
) -> None:
    sweep_file = write_smoke(tmp_path, folder_dir, epochs=30, batch_size=16)
    sweep_id = create(sweep_file)
    store = home_store()
    agent = start(started, "agent", sweep_id, "--wandb", "disabled")  # one worker: it runs in the agent's process
    (held,) = until(lambda: running(store, sweep_id, min_epochs=2), "a run in progress")
    agent.send_signal(signal.SIGTERM)
    stdout, stderr = agent.communicate(timeout=120)
    assert agent.returncode == -signal.SIGTERM, (stdout, stderr)
    assert errors(stderr) == ["error: interrupted (SIGTERM): 1 run(s) requeued; they resume from their last checkpoint"]
    stopped_at = len(store.history(held["id"]))
    assert next(r for r in store.runs(sweep_id) if r["id"] == held["id"])["state"] == "pending" and stopped_at < 30
    assert lenet("agent", sweep_id, "--count", "1", "--wandb", "disabled").exit_code == 0  # resumes that run first
    reference = create(sweep_file)  # the same grid again, never interrupted
    assert lenet("agent", reference, "--count", "1", "--wandb", "disabled").exit_code == 0
    resumed, fresh = store.history(held["id"]), store.history(f"{reference}-{held['idx']:03d}")
    assert len(resumed) == len(fresh) == 30
    assert [[h[k] for k in METRICS] for h in resumed] == [[h[k] for k in METRICS] for h in fresh]


@pytest.mark.slow
def test_sigterm_to_a_fused_agent_requeues_the_pack_and_it_resumes_as_one(
    folder_dir: Path, tmp_path: Path, started: list
) -> None:
    sweep_file = write_smoke(tmp_path, folder_dir, epochs=30, batch_size=16, threads=1)  # relu and tanh packs
    sweep_id = create(sweep_file)
    store = home_store()
    agent = start(started, "agent", sweep_id, "--fuse", "4", "--wandb", "disabled")
    held = until(lambda: len(running(store, sweep_id, min_epochs=2)) == 2 and running(store, sweep_id), "a pack")
    agent.send_signal(signal.SIGTERM)
    stdout, stderr = agent.communicate(timeout=120)
    assert agent.returncode == -signal.SIGTERM, (stdout, stderr)
    assert errors(stderr) == ["error: interrupted (SIGTERM): 2 run(s) requeued; they resume from their last checkpoint"]
    assert {r["id"]: r["state"] for r in store.runs(sweep_id) if r["id"] in {h["id"] for h in held}} == {
        h["id"]: "pending" for h in held
    }
    assert lenet("agent", sweep_id, "--fuse", "4", "--count", "2", "--wandb", "disabled").exit_code == 0
    reference = create(sweep_file)  # the same grid again, never interrupted
    assert lenet("agent", reference, "--fuse", "4", "--count", "2", "--wandb", "disabled").exit_code == 0
    for run in held:
        resumed, fresh = store.history(run["id"]), store.history(f"{reference}-{run['idx']:03d}")
        assert len(resumed) == len(fresh) == 30
        assert [[h[k] for k in METRICS] for h in resumed] == [[h[k] for k in METRICS] for h in fresh]
        assert next(r for r in store.runs(sweep_id) if r["id"] == run["id"])["summary"]["pack_size"] == 2


# ---- full disks (a real 2 MB tmpfs; needs root) ----------------------------------------------------------------


@contextmanager
def tmpfs(path: Path, free: int) -> Iterator[Path]:
    """A 2 MB tmpfs mounted at `path`, filled to leave `free` bytes: room for best.pt (~260 kB) but not last.pt."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        stats = os.statvfs(path)
        (path / "filler").write_bytes(b"\0" * (stats.f_bavail * stats.f_frsize - free))
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=True)


def test_a_full_disk_stops_lenet_train_with_one_line(folder_dir: Path, tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", free=500_000) as out:
        result = lenet("train", *TINY_ARGS, "epochs=3", f"data_dir={folder_dir}", "--wandb", "disabled", "--out", out)
        leftovers = [p.name for p in out.rglob("*.tmp")]
    assert result.exit_code == 1 and "Traceback" not in result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert line.startswith(f"error: cannot write checkpoint {out}/") and "the disk is full; free some space" in line
    assert leftovers == []


@pytest.mark.slow
def test_a_full_disk_stops_the_agent_and_requeues_the_run(folder_dir: Path, tmp_path: Path, started: list) -> None:
    sweep_id = create(write_smoke(tmp_path, folder_dir, epochs=1000, batch_size=16))
    with tmpfs(Path(os.environ["LENET_HOME"]) / "runs", free=500_000) as runs_dir:
        agent = start(started, "agent", sweep_id, "--workers", "2", "--wandb", "disabled")
        stdout, stderr = agent.communicate(timeout=180)
        leftovers = [p.name for p in runs_dir.rglob("*.tmp")]
    assert agent.returncode == 1 and "Traceback" not in stdout + stderr, (stdout, stderr)
    (line,) = errors(stderr)
    assert "cannot write checkpoint" in line and "the disk is full" in line and "was requeued" in line
    assert leftovers == []
    states = [r["state"] for r in home_store().runs(sweep_id)]
    assert "pending" in states and not {"running", "failed"} & set(states)  # nothing orphaned, nothing blamed
