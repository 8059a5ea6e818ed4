"""Store latency at scale: one claim and one hyperband check (`should_stop`) in a sweep of N runs with history.

For each N (ascending, each in its own sweep of one store) the benchmark builds a grid sweep with hyperband early
termination (min_iter 3, eta 3; lr x seed, more grid points than N), adds N runs (`Store.add_runs`), claims
each (`Store.claim`), logs its history (`Store.log_epoch`: {val/acc, val/loss, train/acc, train/loss}, 50 epochs,
25 for the 1% of runs left running) and finishes it (`Store.finish`). Then it times, through the public Store API:
  claim         Store.claim: the next grid point for a worker (a new run, as every claim of a grid sweep is);
  hyperband     Store.should_stop(run_id) for a running run: the check a worker makes after every epoch.
Each is timed `--repeat` times (fewer once `--budget` seconds are spent, never under 3) after one untimed warm-up;
the median is reported. Target: <= 20 ms per claim and per hyperband check at 10,000 runs.

    python benchmarks/store.py --out docs/benchmarks.md
    python benchmarks/store.py --sizes 100 1000 --store /tmp/bench.db
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import platform
import random
import sqlite3
import statistics
import subprocess
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from docblock import write_block  # benchmarks/docblock.py: this folder is on sys.path when run as a script

from ablation.states import FINISHED
from ablation.store import Store

LRS = [0.01, 0.03, 0.1, 0.3]
EPOCHS = 50
RUNNING_SHARE = 100  # 1 run in 100 is still running (at least 2)


def open_store(location: str) -> Store:
    """The store at `location`: a SQLite file path or URL, or a postgresql:// URL (an existing, empty database)."""
    return Store(location)


def sweep_config(n: int, extra: int) -> dict[str, Any]:
    """A grid of lr x seed with room for N runs and `extra` claims; hyperband as in issue 13's scenario."""
    seeds = math.ceil((n + extra) / len(LRS))
    return {
        "name": f"store-bench-{n}",
        "method": "grid",
        "metric": {"name": "val/acc", "goal": "maximize"},
        "parameters": {"lr": {"values": LRS}, "seed": {"values": list(range(seeds))}, "epochs": {"value": EPOCHS}},
        "early_terminate": {"type": "hyperband", "min_iter": 3, "eta": 3},
    }


def metrics(rng: random.Random, skill: float, epoch: int) -> dict[str, float]:
    """One epoch's plausible metrics: accuracy rising towards the run's skill, loss falling."""
    progress = 1 - math.exp(-(epoch + 1) / 8)
    val_acc = min(0.99, 0.1 + (skill - 0.1) * progress + rng.gauss(0, 0.005))
    train_acc = min(0.99, val_acc + 0.05 * progress + rng.gauss(0, 0.005))
    return {
        "val/acc": val_acc,
        "val/loss": 2.3 * (1 - val_acc),
        "train/acc": train_acc,
        "train/loss": 2.2 * (1 - train_acc),
    }


@contextmanager
def quick_writes(store: Store) -> Iterator[None]:
    """Setup's writes without an fsync per commit on a SQLite store (synchronous=NORMAL: one log_epoch takes
    ~0.25 ms instead of ~4 ms, so 10,000 x 50 epochs take minutes, not half an hour); the store's own setting
    again for the timed calls."""
    db = getattr(store, "db", None)
    if not isinstance(db, sqlite3.Connection):
        yield
        return
    before = db.execute("PRAGMA synchronous").fetchone()[0]
    db.execute("PRAGMA synchronous=NORMAL")
    try:
        yield
    finally:
        db.execute(f"PRAGMA synchronous={int(before)}")


def build(store: Store, n: int, extra: int) -> tuple[str, list[str]]:
    """A hyperband grid sweep with N runs, 1% running, `extra` grid points left; returns its id and the running
    runs' ids."""
    sweep_id = store.create_sweep(sweep_config(n, extra), seed=0)
    points = [{"lr": lr, "seed": seed, "epochs": EPOCHS} for seed, lr in itertools.product(range(n), LRS)][:n]
    run_ids = store.add_runs(sweep_id, points)
    running = run_ids[-max(2, n // RUNNING_SHARE) :]
    live = set(running)
    rng = random.Random(n)
    for run_id in run_ids:
        claim = store.claim(sweep_id, "bench-setup")  # the pending runs, in order
        assert not isinstance(claim, str) and claim is not None and claim.run_id == run_id, claim
        skill = rng.uniform(0.45, 0.75)
        history = [metrics(rng, skill, epoch) for epoch in range(EPOCHS // 2 if run_id in live else EPOCHS)]
        for epoch, values in enumerate(history):
            store.log_epoch(run_id, epoch, values)
        if run_id not in live:
            store.finish(run_id, FINISHED, {"best/val_acc": max(h["val/acc"] for h in history)})
    return sweep_id, running


def timed(call: Callable[[int], object], repeat: int, budget: float) -> list[float]:
    """Seconds per call, after one untimed warm-up: `repeat` calls, or at least 3 once `budget` seconds are spent."""
    call(-1)
    times: list[float] = []
    for i in range(repeat):
        tick = time.perf_counter()
        call(i)
        times.append(time.perf_counter() - tick)
        if len(times) >= 3 and sum(times) > budget:
            break
    return times


def measure(store: Store, n: int, repeat: int, budget: float) -> tuple[list[float], list[float], float]:
    """(claim seconds, should_stop seconds, setup seconds) at N runs."""
    tick = time.perf_counter()
    with quick_writes(store):
        sweep_id, running = build(store, n, extra=repeat + 1)  # every timed claim (and the warm-up) a new run
    setup = time.perf_counter() - tick
    for run_id in running:
        store.heartbeat(run_id)  # alive: a claim must not requeue them (setup can outlast the heartbeat timeout)

    def claim(_: int) -> None:
        got = store.claim(sweep_id, "bench")
        assert not isinstance(got, str) and got is not None, f"no run to claim ({got!r}): grid too small"

    claims = timed(claim, repeat, budget)
    checks = timed(lambda i: store.should_stop(running[i % len(running)]), repeat, budget)
    return claims, checks, setup


def machine() -> str:
    """CPU model, usable cores, Python and SQLite versions."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.processor())
    return (
        f"{cpu}, {len(os.sched_getaffinity(0))} usable cores, Python {platform.python_version()}, "
        f"SQLite {sqlite3.sqlite_version}"
    )


def revision() -> str:
    """The code measured: git's short commit, '-dirty' with uncommitted changes."""
    done = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000], help="runs per sweep")
    parser.add_argument("--store", default="", help="store to fill (default: a new SQLite file, deleted after)")
    parser.add_argument("--repeat", type=int, default=7, help="timed calls per measurement (median reported)")
    parser.add_argument("--budget", type=float, default=20.0, help="seconds per measurement before stopping at 3")
    parser.add_argument("--out", type=Path, default=None, help="rewrite the <!-- store --> block of this file")
    parser.add_argument("--marker", default="store", help="the <!-- marker --> block to rewrite")
    parser.add_argument("--code", default="", help="the code measured, for the notes (default: git describe)")
    args = parser.parse_args()
    if min(args.sizes) < 2:
        parser.error("--sizes must be at least 2 (runs per sweep)")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    with tempfile.TemporaryDirectory(prefix="lenet-store-bench-") as scratch:
        location = args.store or str(Path(scratch) / "lenet.db")
        load = f"{os.getloadavg()[0]:.1f}"
        rows, notes = [], []
        with open_store(location) as store:
            for n in sorted(args.sizes):
                claims, checks, setup = measure(store, n, args.repeat, args.budget)
                rows.append(
                    f"| {n:,} | {statistics.median(claims) * 1000:,.1f} | {statistics.median(checks) * 1000:,.1f} |"
                )
                notes.append(f"{n:,}: {len(claims)} claims, {len(checks)} checks, set up in {setup:.0f} s")
                print(rows[-1], f"({notes[-1]})", flush=True)
        kind = "SQLite file (WAL)" if not args.store else f"{args.store}"
    table = "\n".join(["| runs | claim ms | hyperband check ms |", "|---|---|---|", *rows])
    about = (
        f"Medians after one warm-up call each ({'; '.join(notes)}); 1% of runs running (25 epochs), the rest "
        f"finished (50 epochs); load average {load} before, {os.getloadavg()[0]:.1f} after."
    )
    head = f"Machine: {machine()}\nStore: {kind}; code: {args.code or revision()}"
    text = f"{head}\n\n{table}\n\n{textwrap.fill(about, 120)}"
    print(text)
    if args.out:
        write_block(args.out, args.marker, text)


if __name__ == "__main__":
    main()
