"""Fused packs vs one run at a time: model-epochs per second for packs of K members on synthetic data.

Both sides train the same K configs (the modern recipe, distinct seeds, lr spread over K) for the same epochs
in the same process, one after the other; model-epochs/s = K * epochs / wall seconds (data prep included).

    python benchmarks/fused.py --sizes 1 4 16 --train 2048 --epochs 1
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from ablation.config import RunConfig
from ablation.data import Dataset, synthetic_dataset
from ablation.fused import train_pack
from ablation.tracking import NullLogger
from ablation.train import train


def pack_configs(k: int, args: argparse.Namespace) -> list[RunConfig]:
    """K modern runs that differ in seed and lr (one pack)."""
    base = {
        "data": "synthetic",
        "epochs": args.epochs,
        "val_size": args.val,
        "batch_size": args.batch,
        "device": args.device,
        "threads": args.threads,
    }
    seeds = range(k) if args.seeds == "distinct" else [0] * k
    return [RunConfig.from_dict({**base, "seed": s, "lr": 0.05 + 0.1 * i / max(1, k - 1)}) for i, s in enumerate(seeds)]


def run_pack(configs: list[RunConfig], data: Dataset) -> None:
    train_pack(configs, [NullLogger() for _ in configs], dataset=data)


def run_each(configs: list[RunConfig], data: Dataset) -> None:
    for config in configs:
        train(config, NullLogger(), dataset=data)


def timed(fn, *args: object) -> float:  # noqa: ANN001
    start = time.perf_counter()
    fn(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--train", type=int, default=2048, help="synthetic training images (val included)")
    parser.add_argument("--val", type=int, default=256)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--seeds", choices=("distinct", "shared"), default="distinct")
    parser.add_argument("--skip-standalone", action="store_true", help="time packs only (large K)")
    args = parser.parse_args()
    data: Dataset = synthetic_dataset(n_train=args.train, n_test=args.val)
    print(
        f"torch {torch.__version__}, python {platform.python_version()}, device {args.device}, "
        f"{args.train} images, batch {args.batch}, {args.epochs} epoch(s), {args.seeds} seeds"
    )
    print("| K | pack s | pack model-epochs/s | standalone s | standalone model-epochs/s | speed-up |")
    print("|---|---|---|---|---|---|")
    warm = pack_configs(2, args)
    run_pack(warm, data)  # first calls pay one-off costs (kernel selection, allocator): not part of either side
    run_each(warm, data)
    for k in args.sizes:
        configs = pack_configs(k, args)
        model_epochs = k * args.epochs
        pack_s = timed(run_pack, configs, data)
        row = f"| {k} | {pack_s:.2f} | {model_epochs / pack_s:.2f} |"
        if args.skip_standalone:
            print(row + " - | - | - |")
            continue
        alone_s = timed(run_each, configs, data)
        print(row + f" {alone_s:.2f} | {model_epochs / alone_s:.2f} | {alone_s / pack_s:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
