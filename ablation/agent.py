"""Agents: the worker loop for the local engine, process/GPU fan-out, and the W&B-backend training function."""

from __future__ import annotations

import multiprocessing
import os
import socket
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ablation.config import RunConfig
from ablation.errors import LenetError
from ablation.store import WAIT, Claim, Store, heartbeat_timeout, home
from ablation.tracking import FanOut, MemoryLogger, WandbLogger, start_wandb
from ablation.train import cpu_threads, train

Event = Callable[[str, dict[str, Any]], None]  # (kind, details): how workers report to the CLI
POLL_S = 2.0  # how often a worker with nothing to claim looks again while other runs are in flight


@dataclass(frozen=True)
class WorkerSpec:
    """What one worker process needs: which sweeps (in priority order), its name, its share of the machine."""

    sweep_ids: tuple[str, ...]
    name: str
    store_path: Path
    count: int | None = None  # runs to train before exiting (over all its sweeps); None = until they are done
    threads: int = 0  # CPU threads for runs that do not set `threads` themselves
    gpu: str | None = None  # CUDA_VISIBLE_DEVICES for this worker
    wandb_mode: str = "offline"  # each local run is also a W&B run in this mode (offline: `wandb sync` later)


class StoreLogger:
    """Writes each epoch to the store (which also counts as a heartbeat)."""

    def __init__(self, store: Store, run_id: str) -> None:
        self.store = store
        self.run_id = run_id

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.store.log_epoch(self.run_id, step, metrics)

    def progress(self, done: int, total: int) -> None:
        pass

    def summary(self, metrics: dict[str, Any]) -> None:
        pass


class Heartbeat:
    """A background thread that marks a run alive every timeout/4 seconds while it trains."""

    def __init__(self, store_path: Path, run_id: str) -> None:
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, args=(store_path, run_id), daemon=True)

    def _beat(self, store_path: Path, run_id: str) -> None:
        store = Store(store_path)  # its own connection: sqlite connections are not shared across threads
        while not self.stop.wait(heartbeat_timeout() / 4):
            store.heartbeat(run_id)

    def __enter__(self) -> Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join()


def run_config(params: dict[str, Any], spec: WorkerSpec) -> RunConfig:
    """The run's config from the sweep's parameters; the worker's thread share unless the sweep sets threads."""
    config = RunConfig.from_dict(params)
    return config if "threads" in params else replace(config, threads=spec.threads)


def train_claim(store: Store, claim: Claim, spec: WorkerSpec, on_event: Event) -> str:
    """Train one claimed run, recording its history, summary, state or error; returns the final state."""
    run_dir = home_of(spec) / "runs" / claim.run_id
    on_event("start", {"run": claim.run_id, "worker": spec.name, "params": claim.params, "attempt": claim.attempt})
    wandb_run = None
    try:
        config = run_config(claim.params, spec)
        if spec.wandb_mode != "disabled":
            wandb_run = start_wandb(
                config.to_dict(),
                spec.wandb_mode,
                "lenet",
                id=claim.run_id,
                group=claim.sweep_id,
                name=claim.run_id,
                dir=str(home_of(spec)),
                resume="allow",
                job_type="sweep",
            )
        logger = FanOut(StoreLogger(store, claim.run_id), *([WandbLogger(wandb_run)] if wandb_run else []))
        with Heartbeat(spec.store_path, claim.run_id):
            summary = train(
                config,
                logger,
                checkpoint_dir=run_dir,
                resume=claim.attempt > 1,
                should_stop=lambda: store.should_stop(claim.run_id),
            )
        store.finish(claim.run_id, summary["state"], summary)
        on_event("end", {"run": claim.run_id, "state": summary["state"], "summary": summary})
        return summary["state"]
    except KeyboardInterrupt:
        store.requeue(claim.run_id, "agent interrupted; requeued to resume from its last checkpoint")
        raise
    except Exception as exc:  # a failed run is recorded, never allowed to kill the agent
        message = str(exc) if isinstance(exc, LenetError) else f"{type(exc).__name__}: {exc}"
        store.finish(
            claim.run_id,
            "failed",
            error=message + ("" if isinstance(exc, LenetError) else "\n" + traceback.format_exc()),
        )
        on_event("end", {"run": claim.run_id, "state": "failed", "error": message})
        return "failed"
    finally:
        if wandb_run is not None:
            wandb_run.finish()


def home_of(spec: WorkerSpec) -> Path:
    """The project directory that holds this worker's store."""
    return spec.store_path.parent


def claim_next(store: Store, spec: WorkerSpec) -> Claim | str | None:
    """A run from the first of the worker's sweeps that has one; WAIT while any still has runs in flight."""
    waiting = False
    for sweep_id in spec.sweep_ids:
        claim = store.claim(sweep_id, spec.name)
        if isinstance(claim, Claim):
            return claim
        waiting = waiting or claim == WAIT
    return WAIT if waiting else None


def work(spec: WorkerSpec, on_event: Event) -> int:
    """Claim and train runs until all its sweeps are done (or `count` runs); returns how many it trained."""
    if spec.gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = spec.gpu
    store = Store(spec.store_path)
    done = 0
    while spec.count is None or done < spec.count:
        claim = claim_next(store, spec)
        if claim == WAIT:
            time.sleep(POLL_S)
            continue
        if claim is None:
            break
        train_claim(store, claim, spec, on_event)
        done += 1
    on_event("exit", {"worker": spec.name, "runs": done})
    return done


def plan_workers(
    sweep_ids: list[str], store_path: Path, workers: int, gpus: list[str], count: int | None, wandb_mode: str
) -> list[WorkerSpec]:
    """K workers, the CPU cores split between them (no oversubscription), round-robin over `gpus` if given."""
    threads = max(1, cpu_threads(0) // workers)  # GPU workers too, or each one's torch starts a thread per core
    host = socket.gethostname()
    return [
        WorkerSpec(
            tuple(sweep_ids),
            f"{host}-{os.getpid()}-{i}",
            store_path,
            count,
            threads,
            gpus[i % len(gpus)] if gpus else None,
            wandb_mode,
        )
        for i in range(workers)
    ]


def run_agent(specs: list[WorkerSpec], on_event: Event) -> None:
    """Run one worker in this process, or several as spawned processes, until all exit."""
    if len(specs) == 1:
        work(specs[0], on_event)
        return
    context = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch/sqlite state
    procs = [context.Process(target=work, args=(spec, on_event), name=spec.name) for spec in specs]
    for proc in procs:
        proc.start()
    try:
        for proc, spec in zip(procs, specs):
            proc.join()
            if proc.exitcode:
                on_event("worker_died", {"worker": spec.name, "exitcode": proc.exitcode})
    except KeyboardInterrupt:
        for proc in procs:
            proc.join(timeout=30)  # each worker requeues its run on the same Ctrl-C
        raise


def wandb_sweep_function(defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """What `wandb.agent` calls for each run of a W&B sweep: config from the sweep, our training, W&B logging."""
    import wandb

    run = wandb.init(config=defaults)
    try:
        config = RunConfig.from_dict({k: v for k, v in dict(run.config).items() if not k.startswith("_")})
        run.config.update(config.to_dict(), allow_val_change=True)
        summary = train(config, FanOut(WandbLogger(run), MemoryLogger()), checkpoint_dir=home() / "runs" / run.id)
        run.finish(exit_code=0 if summary["state"] != "diverged" else 1)
        return summary
    except BaseException:
        run.finish(exit_code=1)
        raise
