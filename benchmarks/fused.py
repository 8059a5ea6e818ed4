"""Fused packs vs one run at a time vs N processes: model-epochs per second against K, side by side in one run.

For each K the same K configs (the modern recipe, distinct seeds, lr spread over K) are trained three ways:
  pack        ablation.fused.train_pack(configs) in this process: one stacked model, one optimiser step;
  sequential  train(config) for each config in turn, in this process (fresh-process start-up is timed apart);
  N procs     N long-lived worker processes (threads = cores // N each, as `lenet agent --workers N` plans them),
              each training its share of the K configs with train() at the same time.
model-epochs/s = K * epochs / wall seconds; img/s = that x training images per epoch. Everything a run does is
timed (data to device, model build, epochs, validation, the final test evaluation); one-off process costs are
not (a warm-up run comes first everywhere). `--single-run` instead times one whole train() of the modern preset.

    python benchmarks/fused.py --sizes 1 4 16 --train 4096 --epochs 1 --out docs/benchmarks.md
    python benchmarks/fused.py --single-run --single-epochs 30 --train 2048 --out docs/benchmarks.md
    bash scripts/gpu_bench.sh   # on a GPU: K up to 256, --max-sequential/--max-procs bound the slow cases
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from docblock import write_block  # benchmarks/docblock.py: this folder is on sys.path when run as a script

from ablation.config import RunConfig
from ablation.data import Dataset, load_dataset, synthetic_dataset
from ablation.fused import train_pack
from ablation.tracking import NullLogger
from ablation.train import train

COLUMNS = ("s", "me/s", "img/s")  # me/s: model-epochs per second


def cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0))


def bench_dataset(args: argparse.Namespace) -> Dataset:
    """Synthetic images (same seed: the same in every process), or a real dataset cut to --train/--test."""
    if args.data == "synthetic":
        return synthetic_dataset(n_train=args.train or 50_000, n_test=args.test or args.val)
    data = load_dataset(RunConfig.from_dict({"data": args.data, "data_dir": args.data_dir}))
    n_train, n_test = args.train or len(data.train_y), args.test or len(data.test_y)
    return dataclasses.replace(
        data,
        train_x=data.train_x[:n_train],
        train_y=data.train_y[:n_train],
        test_x=data.test_x[:n_test],
        test_y=data.test_y[:n_test],
    )


def run_config(args: argparse.Namespace, seed: int, lr: float, threads: int, epochs: int) -> RunConfig:
    """The modern recipe (RunConfig defaults) on the benchmark's data, device and precision."""
    return RunConfig.from_dict(
        {
            "data": args.data,
            "data_dir": args.data_dir,
            "epochs": epochs,
            "val_size": args.val,
            "batch_size": args.batch,
            "device": args.device,
            "precision": args.precision,
            "threads": threads,
            "seed": seed,
            "lr": lr,
        }
    )


def pack_configs(k: int, args: argparse.Namespace) -> list[RunConfig]:
    """K modern runs with distinct seeds (or seed 0 for all) and peak lr spread over 0.05..0.15."""
    return [
        run_config(
            args,
            i if args.seeds == "distinct" else 0,
            0.1 if k == 1 else 0.05 + 0.1 * i / (k - 1),
            args.threads,
            args.epochs,
        )
        for i in range(k)
    ]


def sync(device: str) -> None:
    """Wait for queued GPU work, so a wall time covers it."""
    if device != "cpu" and torch.cuda.is_available():
        torch.cuda.synchronize()


def time_pack(configs: list[RunConfig], data: Dataset) -> float:
    """Seconds to train the configs as one pack."""
    start = time.perf_counter()
    train_pack(configs, [NullLogger() for _ in configs], dataset=data)
    sync(configs[0].device)
    return time.perf_counter() - start


def time_sequential(configs: list[RunConfig], data: Dataset) -> float:
    """Seconds to train the configs one after the other with train()."""
    start = time.perf_counter()
    for config in configs:
        train(config, NullLogger(), dataset=data)
    sync(configs[0].device)
    return time.perf_counter() - start


def worker(args: argparse.Namespace, threads: int, conn: Any) -> None:
    """A benchmark worker process: load the data, warm up, then train each batch of config dicts it is sent."""
    data = bench_dataset(args)
    train(run_config(args, 0, 0.1, threads, 1), NullLogger(), dataset=data)  # one-off costs, as in the parent
    conn.send("ready")
    while (task := conn.recv()) is not None:
        start = time.monotonic()  # CLOCK_MONOTONIC: one clock for all processes on Linux
        for values in task:
            train(RunConfig.from_dict(values), NullLogger(), dataset=data)
        sync(args.device)
        conn.send((start, time.monotonic()))


class Workers:
    """N long-lived worker processes (spawned: fresh interpreters, like the agent's), each with cores // N threads."""

    def __init__(self, args: argparse.Namespace, n: int) -> None:
        self.n, self.threads = n, max(1, cores() // n)
        context = multiprocessing.get_context("spawn")
        start = time.perf_counter()
        self.conns, self.procs = [], []
        for _ in range(n):
            parent, child = context.Pipe()
            proc = context.Process(target=worker, args=(args, self.threads, child), daemon=True)
            proc.start()
            child.close()  # the worker holds its own copy: a worker that dies then reads as EOF here
            self.conns.append(parent)
            self.procs.append(proc)
        for conn in self.conns:
            self.receive(conn)
        self.startup_s = time.perf_counter() - start

    def receive(self, conn: Any) -> Any:
        """The next message from a worker; a worker that died ends the benchmark with a clear message."""
        try:
            return conn.recv()
        except EOFError:
            conn_proc = self.procs[self.conns.index(conn)]
            conn_proc.join(timeout=10)
            sys.exit(f"error: a benchmark worker died (exit code {conn_proc.exitcode}); its error is above")

    def timed(self, configs: list[RunConfig]) -> float:
        """Seconds from the first worker's start to the last one's end, K/N configs each (round-robin)."""
        shares = [[c.to_dict() for c in configs[i :: self.n]] for i in range(self.n)]
        busy = [(conn, share) for conn, share in zip(self.conns, shares) if share]
        for conn, share in busy:
            conn.send([{**values, "threads": self.threads} for values in share])
        spans = [self.receive(conn) for conn, _ in busy]
        return max(end for _, end in spans) - min(start for start, _ in spans)

    def close(self) -> None:
        """Tell every worker to exit and wait for it."""
        for conn in self.conns:
            with contextlib.suppress(OSError):  # a worker that died (its error is already reported)
                conn.send(None)
        for proc in self.procs:
            proc.join(timeout=30)


def process_startup(device: str, repeats: int = 3) -> float:
    """Median seconds for a fresh `python -c 'import ablation.train'` (plus CUDA init on a GPU) to exit."""
    code = "import ablation.train"
    if device != "cpu":
        code += "; import torch; torch.zeros(1, device='cuda')"
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine(device: str) -> str:
    """CPU model, usable cores, torch, Python and the device."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.processor())
    name = torch.cuda.get_device_name() if device != "cpu" and torch.cuda.is_available() else "CPU"
    return (
        f"{cpu}, {cores()} usable cores, torch {torch.__version__}, Python {platform.python_version()}, "
        f"device {device} ({name})"
    )


def epoch_images(args: argparse.Namespace, data: Dataset) -> int:
    """Training images per epoch: the training split less validation, whole batches only (drop_last)."""
    return (len(data.train_y) - args.val) // args.batch * args.batch


def rate(k: int, epochs: int, images: int, seconds: float | None) -> list[str]:
    """Table cells: seconds, model-epochs/s, img/s (or dashes when not measured)."""
    if seconds is None:
        return ["-"] * len(COLUMNS)
    return [f"{seconds:.2f}", f"{k * epochs / seconds:.2f}", f"{k * epochs * images / seconds:,.0f}"]


def ratio(a: float | None, b: float | None) -> str:
    """How many times faster `a` is than `b` (seconds each), or a dash."""
    return "-" if a is None or b is None else f"{b / a:.2f}x"


def compare(args: argparse.Namespace, data: Dataset, publish: Callable[[str], None]) -> str:
    """The side-by-side table over --sizes, printed and published row by row; returns the Markdown block."""
    images = epoch_images(args, data)
    procs = args.procs or cores()
    header = ["K", *(f"{m} {c}" for m in ("pack", "seq", "procs") for c in COLUMNS)]
    lines = [
        "|" + "|".join([*header, "pack/seq", "pack/procs"]) + "|",  # compact: the header fits in 120 chars
        "|" + "---|" * (len(header) + 2),
    ]
    print("\n".join(lines), flush=True)
    load = f"{os.getloadavg()[0]:.1f}"
    time_pack(pack_configs(2, args), data)  # first calls pay one-off costs (allocator, kernel selection)
    time_sequential(pack_configs(1, args), data)
    workers = Workers(args, procs) if not args.pack_only else None
    try:
        for k in args.sizes:
            configs = pack_configs(k, args)
            sequential = not args.pack_only and (args.max_sequential == 0 or k <= args.max_sequential)
            procs_too = workers is not None and (args.max_procs == 0 or k <= args.max_procs)
            times: dict[str, list[float]] = {"pack": [], "sequential": [], "procs": []}
            for _ in range(args.repeat):  # interleaved, so a burst of load elsewhere hits every method alike
                times["pack"].append(time_pack(configs, data))
                if sequential:
                    times["sequential"].append(time_sequential(configs, data))
                if procs_too:
                    times["procs"].append(workers.timed(configs))
            # The fastest repetition: the one least slowed by other processes on a shared machine.
            pack, alone, multi = (min(t) if t else None for t in times.values())
            cells = [str(k), *rate(k, args.epochs, images, pack), *rate(k, args.epochs, images, alone)]
            cells += [*rate(k, args.epochs, images, multi), ratio(pack, alone), ratio(pack, multi)]
            lines.append("| " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
            publish("\n".join([*lines, "", "(partial: the benchmark was still running or was cut short)"]))
    finally:
        if workers:
            workers.close()
    startup = process_startup(args.device)
    spawn = f"; their start-up (spawn, import, data, warm-up run) took {workers.startup_s:.1f} s" if workers else ""
    notes = [
        f"me/s = model-epochs/s; pack/seq, pack/procs: how many times faster the pack is. "
        f"One epoch = {images:,} training images (batch {args.batch}) + {args.val:,} validation images; "
        f"{args.epochs} epoch(s) per run; {args.data} data; {args.seeds} seeds; precision {args.precision}; "
        f"pack and sequential with {args.threads or cores()} thread(s); "
        f"fastest of {args.repeat} interleaved repetition(s); load average {load} before, "
        f"{os.getloadavg()[0]:.1f} after.",
        f"N procs = min(K, {procs}) worker processes with {max(1, cores() // procs)} thread(s) each{spawn}, "
        "not timed. Sequential runs are in-process; a fresh `python -c 'import ablation.train'` process takes "
        f"{startup:.2f} s to start and exit (median of 3), which one process per run would add to every run.",
    ]
    notes = [textwrap.fill(note, 120) for note in notes]  # the block lands in a Markdown file with 120-char lines
    print("\n" + "\n".join(notes), flush=True)
    return "\n".join([*lines, "", *notes])


def single_run(args: argparse.Namespace, data: Dataset) -> str:
    """Wall time of one whole train() of the modern preset for --single-epochs epochs, after a warm-up run."""
    time_sequential([run_config(args, 0, 0.1, args.threads, 1)], data)
    config = run_config(args, 0, 0.1, args.threads, args.single_epochs)
    seconds = min(time_sequential([config], data) for _ in range(args.repeat))
    images = epoch_images(args, data)
    return textwrap.fill(
        f"One `modern` run, {args.single_epochs} epochs of {images:,} training + {args.val:,} validation images "
        f"({args.data} data, batch {args.batch}, precision {args.precision}, {args.threads or cores()} thread(s)), "
        "in a warm process, "
        f"fastest of {args.repeat}: "
        f"**{seconds:.1f} s** ({seconds / args.single_epochs:.2f} s/epoch, "
        f"{args.single_epochs * images / seconds:,.0f} training img/s).",
        120,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 16], help="pack sizes K")
    parser.add_argument("--train", type=int, default=4096, help="training images incl. validation (0: all)")
    parser.add_argument("--val", type=int, default=512, help="validation images held out of --train")
    parser.add_argument("--test", type=int, default=0, help="test images (0: synthetic --val, real all)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=1, help="epochs per run")
    parser.add_argument("--data", default="synthetic", help="synthetic, or a real dataset such as cifar10")
    parser.add_argument("--data-dir", default="", help="where the real dataset is (default: lenet's)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--precision", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), fp32 or bf16")
    parser.add_argument("--threads", type=int, default=0, help="threads of pack and sequential (0: the cores)")
    parser.add_argument("--seeds", choices=("distinct", "shared"), default="distinct")
    parser.add_argument("--procs", type=int, default=0, help="N worker processes (0: the usable CPU cores)")
    parser.add_argument("--repeat", type=int, default=1, help="time each case this often; report the fastest")
    parser.add_argument("--max-sequential", type=int, default=0, help="time sequential only up to this K (0: all)")
    parser.add_argument("--max-procs", type=int, default=0, help="time N procs only up to this K (0: all)")
    parser.add_argument("--pack-only", action="store_true", help="time packs only")
    parser.add_argument("--single-run", action="store_true", help="time one whole modern run instead")
    parser.add_argument("--single-epochs", type=int, default=30)
    parser.add_argument("--out", type=Path, default=None, help="write the results into this Markdown file")
    parser.add_argument("--marker", default="", help="the <!-- marker --> block to rewrite (default: fused)")
    args = parser.parse_args()
    if args.train and args.train <= args.val + args.batch:
        parser.error(f"--train {args.train} leaves no whole batch after --val {args.val}; raise --train")
    data = bench_dataset(args)
    head = f"Machine: {machine(args.device)}"
    print(head, flush=True)
    marker = args.marker or ("fused-single" if args.single_run else "fused")

    def publish(body: str) -> None:  # rewritten after every row, so a run cut short still leaves its rows
        if args.out:
            write_block(args.out, marker, f"{head}\n\n{body}")

    if args.single_run:
        body = single_run(args, data)
        print(body)
    else:
        body = compare(args, data, publish)
    publish(body)


if __name__ == "__main__":
    main()
