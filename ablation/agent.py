"""Agents: the worker loop for the local engine, process/GPU fan-out, and the W&B-backend training function."""

from __future__ import annotations

import ctypes
import functools
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from ablation.config import RunConfig
from ablation.errors import CheckpointError, ConfigError, Interrupted, LenetError, OutputError, StoreError
from ablation.fused import fusable, pack_key, train_pack
from ablation.paths import write_bytes
from ablation.signals import StopRequest, StopSignal, signal_name
from ablation.states import DIVERGED, FAILED, PENDING, RUNNING, STOPPED
from ablation.store import WAIT, Claim, Store, heartbeat_timeout, home, runs_home, shown, store_location
from ablation.tracking import FanOut, MemoryLogger, WandbLogger, start_wandb
from ablation.train import cpu_threads, load_checkpoint, resumable, train

Event = Callable[[str, dict[str, Any]], None]  # (kind, details): how workers report to the CLI
T = TypeVar("T")
POLL_S = 2.0  # how often a worker with nothing to claim looks again while other runs are in flight
INTERRUPTED = "agent interrupted; requeued to resume from its last checkpoint"  # the store's reason for a stop
MAX_REPLACEMENTS = 3  # new processes per worker slot after unexpected deaths (a crash loop must end)
PR_SET_PDEATHSIG = 1  # prctl(2) option: the signal this process gets when its parent dies (Linux)
# Default pack size on a GPU: a LeNet-5 step is launch-bound, so K members cost little more than one step (one
# H200: 20 model-epochs/s at K=64 against 11 at 16; docs/benchmarks.md). On CPU packs measured slower than one run
# at a time, so the default there is 1.
GPU_PACK = 64
# Pack workers one GPU serves well: more processes are time-sliced, not run side by side (14 processes on one H200
# made each pack ~10x slower than alone; docs/results/README.md, GPU share).
PACK_WORKERS_PER_GPU = 4
STOP_GRACE_S = 30.0  # how long stopped workers may take to requeue their runs before they are killed


@dataclass(frozen=True)
class WorkerSpec:
    """What one worker process needs: which sweeps (in priority order), its name, its share of the machine."""

    sweep_ids: tuple[str, ...]
    name: str
    store_path: Path | str  # the store's location: a SQLite file or a PostgreSQL URL (Store.location)
    count: int | None = None  # runs to train before exiting (over all its sweeps); None = until they are done
    threads: int = 0  # CPU threads for runs that do not set `threads` themselves
    gpu: str | None = None  # CUDA_VISIBLE_DEVICES for this worker
    wandb_mode: str = "offline"  # each local run is also a W&B run in this mode (offline: `wandb sync` later)
    fuse: int = 1  # runs trained at once as one pack (ablation.fused); 1 = one run at a time
    home: Path | None = None  # checkpoints and offline W&B runs (None: beside the store file, as runs_home says)


class StoreLogger:
    """Writes each epoch to the store (which also counts as a heartbeat)."""

    def __init__(self, store: Store, run_id: str) -> None:
        self.store = store
        self.run_id = run_id

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.store.log_epoch(self.run_id, step, metrics)

    def progress(self, done: int, total: int, stage: str = "") -> None:
        pass

    def summary(self, metrics: dict[str, Any]) -> None:
        pass


CHECKPOINT_FILES = ("best.pt", "last.pt")  # a run's files a PostgreSQL store keeps copies of


class CheckpointMirror:
    """Copies a run's checkpoint files into a PostgreSQL store whenever they changed: at every epoch (last.pt is
    then the previous epoch's, written after the log) and at the end. Another host resumes the run from there."""

    def __init__(self, store: Store, run_id: str, run_dir: Path) -> None:
        self.store, self.run_id, self.run_dir = store, run_id, run_dir
        self.copied: dict[str, int] = {}  # file name -> the st_mtime_ns copied

    def _copy(self) -> None:
        for name in CHECKPOINT_FILES:
            path = self.run_dir / name
            try:
                stamp = path.stat().st_mtime_ns
            except FileNotFoundError:
                continue
            if self.copied.get(name) != stamp:
                data = path.read_bytes()
                self.store.put_checkpoint(self.run_id, name, load_checkpoint(path)["epoch"], data)
                self.copied[name] = stamp

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self._copy()

    def progress(self, done: int, total: int, stage: str = "") -> None:
        pass

    def summary(self, metrics: dict[str, Any]) -> None:
        self._copy()


def fetch_checkpoints(store: Store, run_id: str, run_dir: Path) -> None:
    """Bring a run's checkpoints from a PostgreSQL store into `run_dir` where the local copy is missing or older
    (the run last trained on another host)."""
    for name in CHECKPOINT_FILES:
        stored = store.checkpoint(run_id, name)
        path = run_dir / name
        if stored and local_epoch(path) < stored[0]:
            write_bytes(path, stored[1], "checkpoint", "set LENET_HOME to a writable folder with free space")


def resumable_epoch(path: Path, config: RunConfig) -> int:
    """The epoch this host's last.pt of the run ended; -1 where it is missing, damaged or another run's."""
    try:
        payload = resumable(path, config)
    except CheckpointError:
        return -1
    return payload["epoch"] if payload else -1


def local_epoch(path: Path) -> int:
    """The epoch a checkpoint file ended; -1 where it is missing or damaged (the store's copy replaces it)."""
    try:
        return load_checkpoint(path)["epoch"] if path.exists() else -1
    except CheckpointError:
        return -1


def run_checkpoint(run_id: str, name: str = "best.pt") -> Path:
    """A run's checkpoint by run id: in this host's runs folder, else copied there from a PostgreSQL store."""
    location = store_location()
    folder = run_folder(runs_home(location), run_id)
    if not (folder / name).exists() and isinstance(location, str):  # PostgreSQL: maybe trained on another host
        with Store(location) as store:
            fetch_checkpoints(store, run_id, folder)
    if not (folder / name).exists():
        raise CheckpointError(
            f"{run_id} is neither a checkpoint file nor a run with a {name} in {folder}"
            + ("" if isinstance(location, Path) else f" or in the store {shown(location)}")
            + "; pass a checkpoint's path, or a run id (`lenet sweep status SWEEP_ID` lists them)"
        )
    return folder / name


def run_loggers(store: Store, run_id: str, run_dir: Path, wandb_run: Any) -> FanOut:
    """Where a claimed run reports: the store (history, heartbeat), its checkpoints' copies in a PostgreSQL store,
    and its W&B run."""
    mirror = [CheckpointMirror(store, run_id, run_dir)] if store.postgres else []
    return FanOut(StoreLogger(store, run_id), *mirror, *([WandbLogger(wandb_run)] if wandb_run else []))


class Heartbeat:
    """A background thread that marks runs alive every timeout/4 seconds while they train."""

    def __init__(self, store_path: Path | str, *run_ids: str) -> None:
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, args=(store_path, run_ids), daemon=True)

    def _beat(self, store_path: Path | str, run_ids: tuple[str, ...]) -> None:
        # Its own connection (sqlite connections are not shared across threads), opened once: opening a store
        # checks the whole file, which costs seconds for a large one.
        store = None
        try:
            while not self.stop.wait(heartbeat_timeout() / 4):
                try:
                    store = store or Store(store_path)
                    store.heartbeat(*run_ids)  # one write: a pack's members never miss a beat one by one
                except StoreError:  # a busy or locked store: the next beat retries (epochs also count as beats)
                    pass
        finally:
            if store is not None:
                store.close()

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


def train_claim(store: Store, claim: Claim, spec: WorkerSpec, on_event: Event, stop: StopRequest | None = None) -> str:
    """Train one claimed run, recording its history, summary, state or error; returns the final state."""
    # How a stop signal, a failed checkpoint write or another error ends it: `settle`.
    stop = stop or StopRequest()  # never set: nothing stops this run from outside
    run_dir = run_folder(home_of(spec), claim.run_id)
    on_event("start", {"run": claim.run_id, "worker": spec.name, "params": claim.params, "attempt": claim.attempt})
    wandb_run = None
    try:
        config = run_config(claim.config or claim.params, spec)  # the full config the store recorded at claim
        wandb_run = claim_wandb(store, claim, spec, config)
        logger = run_loggers(store, claim.run_id, run_dir, wandb_run)
        if claim.attempt > 1 and store.postgres:
            fetch_checkpoints(store, claim.run_id, run_dir)
        with Heartbeat(spec.store_path, claim.run_id), stop.deferred():  # a signal ends training at the next batch
            summary = train(
                config,
                logger,
                checkpoint_dir=run_dir,
                resume=claim.attempt > 1,
                should_stop=lambda: store.should_stop(claim.run_id),
                stop_now=stop,
            )
        if stop.signum is not None:  # stopped by a signal, not by the sweep: the run is not over
            raise StopSignal(stop.signum)
        store.finish(claim.run_id, summary["state"], summary)
        on_event("end", {"run": claim.run_id, "state": summary["state"], "summary": summary})
        return summary["state"]
    except BaseException as exc:
        settle(store, [claim.run_id], exc, stop, on_event)
        return FAILED
    finally:
        if wandb_run is not None:
            wandb_run.finish()


def settle(store: Store, run_ids: list[str], exc: BaseException, stop: StopRequest, on_event: Event) -> None:
    """After `exc` ended training of `run_ids`: hand them back and re-raise, or record them as failed."""
    # A stop signal or Ctrl-C (also when it surfaced as another error: a library caught and re-raised it) requeues
    # them, to resume exactly; a full or read-only disk (OutputError) is not their fault: requeued, and raised to
    # stop the worker. Anything else fails them, never the agent.
    if not isinstance(exc, Exception):  # KeyboardInterrupt (StopSignal is one), SystemExit: not a failed run
        if isinstance(exc, KeyboardInterrupt):
            store.requeue(run_ids, INTERRUPTED)
        raise exc
    if stop.signum is not None:
        store.requeue(run_ids, INTERRUPTED)
        raise StopSignal(stop.signum) from None
    if isinstance(exc, OutputError):
        store.requeue(run_ids, f"requeued: {exc}")
        which = f"run {run_ids[0]} was" if len(run_ids) == 1 else f"runs {', '.join(run_ids)} were"
        raise OutputError(f"{exc}; {which} requeued") from None
    message = str(exc) if isinstance(exc, LenetError) else f"{type(exc).__name__}: {exc}"
    detail = "" if isinstance(exc, LenetError) else "\n" + traceback.format_exc()
    for run_id in run_ids:
        store.finish(run_id, FAILED, error=message + detail)
        on_event("end", {"run": run_id, "state": FAILED, "error": message})


def claim_wandb(store: Store, claim: Claim, spec: WorkerSpec, config: RunConfig) -> Any:
    """The W&B run that mirrors a claimed run (None with W&B disabled); a resumed run continues the same one."""
    if spec.wandb_mode == "disabled":
        return None
    sweep = store.sweep(claim.sweep_id)  # runs go where `lenet sweep create --project/--entity` said
    return start_wandb(
        config.to_dict(),
        spec.wandb_mode,
        sweep["project"] or "lenet",
        entity=sweep["entity"],
        console="off",  # this worker's console carries every run's events; a failure's traceback is stored
        id=claim.run_id,
        group=claim.sweep_id,
        name=claim.run_id,
        dir=str(home_of(spec)),
        resume="allow",
        job_type="sweep",
        reinit="create_new",  # a pack's members are W&B runs open at once in this process
    )


def home_of(spec: WorkerSpec) -> Path:
    """The project directory for this worker's checkpoints and offline W&B runs."""
    return spec.home if spec.home is not None else runs_home(spec.store_path)


def run_folder(project: Path, run_id: str) -> Path:
    """Where a run's checkpoints live under a project directory (the one owner of that layout)."""
    return project / "runs" / run_id


def claim_next(store: Store, spec: WorkerSpec, limit: int = 1) -> list[Claim] | str | None:
    """Runs from the first of the worker's sweeps that has some (up to `limit`, one pack); WAIT while any
    still has runs in flight."""
    waiting = False
    key = functools.partial(pack_of, spec=spec, store=store) if limit > 1 else None
    for sweep_id in spec.sweep_ids:
        claims = store.claim_many(sweep_id, spec.name, limit, {"threads": spec.threads}, key)  # configs stored
        if isinstance(claims, list):
            return claims
        waiting = waiting or claims == WAIT
    return WAIT if waiting else None


def pack_of(claim: Claim, spec: WorkerSpec, store: Store | None = None) -> Hashable | None:
    """Which pack a claimed run may join (None: it trains alone): runs that agree on `pack_key` and ended the
    same epoch (0: fresh). A resumed run's epoch is its newest last.pt's, here or in a PostgreSQL `store` (it may
    have trained on another host since: `train_pack_claims` fetches that copy)."""
    # Called inside claim_many's transaction, which holds the store's write lock: the store copy's epoch only, and
    # this host's last.pt (small: LeNet-5's weights and optimiser state).
    try:
        config = run_config(claim.config, spec) if claim.config is not None else None
    except ConfigError:
        config = None
    if config is None or not fusable(config):
        return None  # invalid parameters fail alone, saying why
    if claim.attempt == 1:
        return pack_key(config), 0
    last = run_folder(home_of(spec), claim.run_id) / "last.pt"
    stored = store.checkpoint_epoch(claim.run_id, "last.pt") if store is not None and store.postgres else None
    local = resumable_epoch(last, config)
    if local < 0 and stored is None:  # never trained, damaged, or on another host without a store copy
        return None
    return pack_key(config), max(local, stored or 0)


def work(spec: WorkerSpec, on_event: Event, stop: StopRequest | None = None) -> int:
    """Claim and train runs (`spec.fuse` at a time, as one pack) until all its sweeps are done (or `count`
    runs); returns how many it trained."""
    # `stop`, set by a signal, ends it (StopSignal) with its runs requeued.
    if spec.gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = spec.gpu
    store = Store(spec.store_path)
    done = 0
    while spec.count is None or done < spec.count:
        limit = spec.fuse if spec.count is None else min(spec.fuse, spec.count - done)
        claims = claim_next(store, spec, limit)
        if claims == WAIT:
            time.sleep(POLL_S)
            continue
        if claims is None:
            break
        if len(claims) == 1:
            train_claim(store, claims[0], spec, on_event, stop)
        else:
            train_pack_claims(store, claims, spec, on_event, stop)
        done += len(claims)
    on_event("exit", {"worker": spec.name, "runs": done})
    return done


def train_pack_claims(
    store: Store, claims: list[Claim], spec: WorkerSpec, on_event: Event, stop: StopRequest | None = None
) -> None:
    """Train claimed runs as one pack (ablation.fused); each stays its own run in the store and in W&B."""
    # A member that ends before the others (hyperband, early stopping, divergence) is recorded at once; the rest
    # are settled as train_claim's run (requeued members resume as one pack from their last.pt).
    stop = stop or StopRequest()
    ids = [c.run_id for c in claims]
    ended: set[int] = set()
    runs: list[Any] = []
    for claim in claims:
        on_event("start", {"run": claim.run_id, "worker": spec.name, "params": claim.params, "attempt": claim.attempt})

    def on_end(i: int, summary: dict[str, Any]) -> None:
        if stop.signum is not None and summary["state"] == STOPPED:
            return  # stopped by the signal, not by the sweep: requeued below
        store.finish(ids[i], summary["state"], summary)
        ended.add(i)
        on_event("end", {"run": ids[i], "state": summary["state"], "summary": summary})

    try:
        configs = [run_config(c.config or c.params, spec) for c in claims]
        for claim, config in zip(claims, configs):  # one at a time: `finally` finishes those started
            runs.append(claim_wandb(store, claim, spec, config))
        dirs = [run_folder(home_of(spec), run_id) for run_id in ids]
        for claim, folder in zip(claims, dirs):
            if claim.attempt > 1 and store.postgres:  # the newer copy `pack_of` counted on
                fetch_checkpoints(store, claim.run_id, folder)
        loggers = [run_loggers(store, run_id, folder, r) for run_id, folder, r in zip(ids, dirs, runs)]
        with Heartbeat(spec.store_path, *ids), stop.deferred():  # a signal ends training at the next batch
            train_pack(
                configs,
                loggers,
                dirs,
                should_stop=lambda i: store.should_stop(ids[i]),
                stop_now=stop,
                resume=any(c.attempt > 1 for c in claims),
                on_end=on_end,
            )
        if stop.signum is not None:
            raise StopSignal(stop.signum)
    except BaseException as exc:  # members still training: as train_claim's run
        settle(store, [run_id for i, run_id in enumerate(ids) if i not in ended], exc, stop, on_event)
    finally:
        for run in runs:
            if run is not None:
                run.finish()


def plan_workers(
    sweep_ids: list[str],
    store_path: Path | str,
    workers: int,
    gpus: list[str],
    count: int | None,
    wandb_mode: str,
    fuse: int | None = None,
) -> list[WorkerSpec]:
    """K workers, the CPU cores split between them (no oversubscription), round-robin over `gpus` if given;
    each trains `fuse` runs at a time (default: GPU_PACK on a GPU, 1 on CPU)."""
    threads = max(1, cpu_threads(0) // workers)  # GPU workers too, or each one's torch starts a thread per core
    host = socket.gethostname()
    pack = fuse or default_pack(gpus)
    return [
        WorkerSpec(
            tuple(sweep_ids),
            f"{host}-{os.getpid()}-{i}",
            store_path,
            count,
            threads,
            gpus[i % len(gpus)] if gpus else None,
            wandb_mode,
            pack,
            runs_home(store_path),
        )
        for i in range(workers)
    ]


def default_pack(gpus: list[str]) -> int:
    """Runs per pack when `--fuse` is not given: GPU_PACK with a GPU, else 1 (on CPU a pack is slower)."""
    import torch

    return GPU_PACK if gpus or torch.cuda.is_available() else 1


def crowded_gpus(specs: list[WorkerSpec], cuda: bool | None = None) -> dict[str, int]:
    """GPUs given more than PACK_WORKERS_PER_GPU pack workers, with their count ("" = the visible GPU of workers
    without --gpus, when `cuda`: default, whether torch sees one)."""
    if cuda is None and any(s.gpu is None and s.fuse > 1 for s in specs):
        import torch

        cuda = torch.cuda.is_available()
    shared = Counter(s.gpu or "" for s in specs if s.fuse > 1 and (s.gpu is not None or cuda))
    return {gpu: n for gpu, n in shared.items() if n > PACK_WORKERS_PER_GPU}


def run_agent(specs: list[WorkerSpec], on_event: Event) -> None:
    """Run the workers until their sweeps are done: one in this process, several as child processes."""
    # SIGTERM or SIGINT (to the agent or its process group) stops every worker; each requeues its run at once
    # (it resumes exactly from last.pt) and `Interrupted` says how many were. A worker's LenetError (a full disk)
    # stops the others the same way and is raised here.
    store = Store(specs[0].store_path)
    with StopRequest(raise_in_main=True) as stop:  # later signals are ignored: the clean-up must not be cut short
        try:
            if len(specs) == 1:
                work(specs[0], on_event, stop)
            else:
                supervise(specs, on_event, store, stop)
        except BaseException as exc:
            count = requeue_held(store, specs)
            if isinstance(exc, StopSignal):
                resume = "; they resume from their last checkpoint" if count else ""
                message = f"interrupted ({signal_name(exc.signum)}): {count} run(s) requeued{resume}"
                raise Interrupted(message, exc.signum) from None
            raise


def supervise(specs: list[WorkerSpec], on_event: Event, store: Store, stop: StopRequest) -> None:
    """Run each worker in a child process until all exit, replacing those that die; an exception stops them all."""
    # A dead worker's run is requeued at once; its slot gets at most MAX_REPLACEMENTS new processes.
    context = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch/sqlite state
    slots: dict[int, tuple[Any, Any]] = {}  # slot -> (process, the pipe its LenetError would come through)
    replaced = [0] * len(specs)
    try:
        for i, spec in enumerate(specs):
            slots[i] = start_worker(context, spec, on_event, stop)
        while slots:
            if stop.signum is not None:  # a signal that arrived while a worker was starting
                raise StopSignal(stop.signum)
            multiprocessing.connection.wait([proc.sentinel for proc, _ in slots.values()])
            for i, (proc, errors) in list(slots.items()):
                if proc.is_alive():
                    continue
                del slots[i]
                exitcode, pid, error = proc.exitcode, proc.pid, worker_error(errors)
                errors.close()
                proc.close()
                if error is not None:  # the worker stopped on a LenetError (a full disk): it is the agent's now
                    raise error
                if exitcode != 0 and after_death(store, specs[i], exitcode, pid, replaced[i], on_event):
                    replaced[i] += 1
                    slots[i] = start_worker(context, specs[i], on_event, stop)
    finally:
        stop_workers([proc for proc, _ in slots.values()])


def after_death(store: Store, spec: WorkerSpec, exitcode: int, pid: int, replaced: int, on_event: Event) -> bool:
    """Requeue the runs of a worker that died and report it; returns whether to start a replacement."""
    lost = held_runs(store, spec.sweep_ids, {spec.name}, pid)
    store.requeue(lost, f"worker died (exit code {exitcode}); requeued")
    again = replaced < MAX_REPLACEMENTS  # a crash loop must end
    replacement = f"{replaced + 1}/{MAX_REPLACEMENTS}" if again else None
    on_event("worker_died", {"worker": spec.name, "exitcode": exitcode, "requeued": lost, "replacement": replacement})
    return again


def start_worker(context: Any, spec: WorkerSpec, on_event: Event, stop: StopRequest) -> tuple[Any, Any]:
    """Start one worker process; returns it and the pipe its LenetError would come through."""
    # A signal only sets `stop` meanwhile (raised inside Process.start it would leave a child waiting for its
    # start-up data). The child starts with SIGINT ignored (a disposition survives exec), so a Ctrl-C during its
    # start-up prints no KeyboardInterrupt traceback; `worker_process` then handles SIGINT. This process blocks
    # SIGINT while it ignores it, and Linux keeps a blocked signal pending, so a Ctrl-C meanwhile is not lost.
    errors, sender = context.Pipe(duplex=False)  # a pipe, not a Queue: no semaphores to leak if the agent is killed
    proc = context.Process(target=worker_process, args=(spec, on_event, sender, os.getpid()), name=spec.name)
    with stop.deferred():
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            proc.start()
        finally:
            signal.signal(signal.SIGINT, handler)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a Ctrl-C held back meanwhile arrives now
            sender.close()  # the worker holds its own copy
    return proc, errors


def worker_error(errors: Any) -> LenetError | None:
    """The LenetError an exited worker sent, if any (a worker that died sent nothing: the pipe is at its end)."""
    try:
        return errors.recv() if errors.poll() else None
    except EOFError:
        return None


def worker_process(spec: WorkerSpec, on_event: Event, errors: Any, parent: int) -> None:
    """A worker process's entry point: ends quietly on a stop or its agent's death; LenetErrors go to `errors`."""
    # A stop signal, or the death of the agent (`parent`, its pid passed in: by now getppid() may already say 1),
    # requeues its run and ends it with exit 128 + signal; a LenetError goes to the agent (exit 1).
    die_with_parent()
    if os.getppid() != parent:  # the agent died during this process's start-up (the torch import): claim nothing
        sys.exit(128 + signal.SIGTERM)
    watch_parent(parent)
    try:
        with StopRequest(raise_in_main=True) as stop:
            work(spec, on_event, stop)
    except StopSignal as signalled:
        sys.exit(128 + signalled.signum)
    except LenetError as exc:
        errors.send(exc)
        sys.exit(1)


def die_with_parent() -> None:
    """On Linux, have the kernel SIGTERM this process when its parent dies (a guard besides `watch_parent`)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):  # no usable libc: watch_parent alone still stops this process
        pass


def watch_parent(parent: int, interval: float = 1.0) -> None:
    """SIGTERM this process once process `parent` is no longer its parent (the agent was killed with -9)."""
    # A worker never outlives its agent, and stops exactly as if the agent had stopped it.

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="watch-parent", daemon=True).start()


def stop_workers(procs: list[Any]) -> None:
    """SIGTERM every live worker (each requeues its run), wait up to STOP_GRACE_S, then SIGKILL the rest."""
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join()


def held_runs(store: Store, sweep_ids: Iterable[str], workers: set[str], pid: int | None = None) -> list[str]:
    """Ids of the runs these workers (by name, and process id if given) hold: claimed and still running."""
    return [
        run["id"]
        for sweep_id in sweep_ids
        for run in store.runs(sweep_id)
        if run["state"] == RUNNING and run["worker"] in workers and (pid is None or run["pid"] == pid)
    ]


def requeue_held(store: Store, specs: list[WorkerSpec]) -> int:
    """Requeue the runs the agent's workers still hold; returns how many of their runs a stop requeued in all."""
    # A worker killed before it could requeue its run leaves it running; the count includes the workers' own.
    names = {spec.name for spec in specs}
    store.requeue(held_runs(store, specs[0].sweep_ids, names), INTERRUPTED)
    return sum(
        run["state"] == PENDING and run["worker"] in names and run["error"] == INTERRUPTED
        for sweep_id in specs[0].sweep_ids
        for run in store.runs(sweep_id)
    )


def wandb_sweep_function(defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """What `wandb.agent` calls for each run of a W&B sweep: config from the sweep, our training, W&B logging."""
    # A stop ends the run as `stopped` at the next batch, with its summary and the best epoch's test metrics:
    # W&B's agent (hyperband, Ctrl-C) stops a run by raising an exception in this thread; SIGTERM and SIGINT
    # do the same where this runs in the main thread.
    import wandb

    run = wandb.init(config=defaults)
    try:
        config = RunConfig.from_dict({k: v for k, v in dict(run.config).items() if not k.startswith("_")})
        run.config.update(config.to_dict(), allow_val_change=True)
        logger = FanOut(WandbLogger(run), MemoryLogger())
        with StopRequest() as stop:
            summary = run_stoppable(
                lambda: train(config, logger, checkpoint_dir=run_folder(home(), run.id), stop_now=stop), stop
            )
        run.finish(exit_code=0 if summary["state"] != DIVERGED else 1)
        return summary
    except BaseException:
        run.finish(exit_code=1)
        raise


def run_stoppable(fn: Callable[[], T], stop: StopRequest) -> T:
    """`fn()` in a helper thread; an exception raised into this waiting thread sets `stop` instead."""
    # That exception is how W&B's agent stops a run: setting `stop` ends `fn` at its next batch, with a summary,
    # instead of abandoning the run mid-epoch.
    outcome: dict[str, Any] = {}
    done = threading.Event()

    def target() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:
            outcome["error"] = exc
        finally:
            done.set()

    threading.Thread(target=target, name="lenet-train", daemon=True).start()
    while True:  # the whole wait is inside the try: the exception can land on any line of it
        try:
            while not done.is_set():
                time.sleep(0.1)  # not Event.wait: an exception raised inside a lock wait can leave the lock taken
            break
        except Exception:  # W&B's agent: PyThreadState_SetAsyncExc(thread, Exception); wait for `fn` to end
            stop.set()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
