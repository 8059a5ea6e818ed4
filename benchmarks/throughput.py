"""End-to-end training throughput: lenet's in-memory uint8 pipeline vs a conventional torchvision one.

Both train the same LeNet-5 with the same optimiser, batch size and augmentation on the same
machine in the same run; images/s counts everything from stored images to the optimiser step.

    python benchmarks/throughput.py --data-dir ~/.cache/lenet --out docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from ablation.config import RunConfig
from ablation.data import channel_stats, data_root, find_image_folder, load_dataset, split_train_val
from ablation.model import build_model
from ablation.tracking import NullLogger
from ablation.train import Trainer, cpu_math, make_optimizer, memory_format, prepare, resolve_device

CASES = {
    "relu, max pool, no BN, crop+flip, SGD momentum, batch 512": {
        "activation": "relu",
        "pooling": "max",
        "norm": "none",
        "augment": "crop_flip",
        "optimizer": "momentum",
        "batch_size": 512,
        "label_smoothing": 0.0,
        "dropout": 0.0,
    },
    "modern preset": {"preset": "modern"},
}


def bench_lenet(config: RunConfig, epochs: int) -> tuple[float, float]:
    """(median images/s over whole training epochs, seconds to load the cached dataset)."""
    tick = time.perf_counter()
    dataset = load_dataset(config)
    load_s = time.perf_counter() - tick
    device = resolve_device(config.device)
    train_b, _, _ = prepare(config, dataset, device)
    model = build_model(config).to(device, memory_format=memory_format(config))
    trainer = Trainer(config, model, train_b, None, NullLogger())
    trainer.epoch()  # warm-up: first-call allocations and oneDNN kernel selection
    rates = []
    for _ in range(epochs):
        tick = time.perf_counter()
        rates.append(trainer.epoch()[2] / (time.perf_counter() - tick))
    return statistics.median(rates), load_s


def bench_conventional(config: RunConfig, workers: int, batches: int) -> float:
    """images/s of ImageFolder + transforms + DataLoader feeding the same model and optimiser."""
    root = find_image_folder(data_root(config))
    dataset = load_dataset(config)
    mean, std = channel_stats(split_train_val(dataset, config.val_size, config.split_seed)[0])
    steps = [transforms.RandomCrop(32, padding=4, padding_mode="reflect"), transforms.RandomHorizontalFlip()]
    pipeline = transforms.Compose(
        [
            *steps,
            transforms.ToTensor(),
            transforms.Normalize((mean / 255).flatten().tolist(), (std / 255).flatten().tolist()),
        ]
    )
    loader = DataLoader(
        datasets.ImageFolder(str(root / "train"), transform=pipeline),
        batch_size=config.batch_size,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        persistent_workers=workers > 0,
    )
    model = build_model(config)
    optimizer = make_optimizer(model, config)
    model.train()
    seen, tick = 0, 0.0
    for i, (x, y) in enumerate(loader):
        if i == 2:  # the first batches include worker start-up; time the steady state
            seen, tick = 0, time.perf_counter()
        loss = F.cross_entropy(model(x), y, label_smoothing=config.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += len(y)
        if i == batches + 1:
            break
    return seen / (time.perf_counter() - tick)


def machine() -> str:
    """CPU model, usable cores, torch version."""
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    cores = len(os.sched_getaffinity(0))
    return f"{cpu}, {cores} usable cores, torch {torch.__version__}, Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="", help="folder holding the CIFAR-10 image folder")
    parser.add_argument("--epochs", type=int, default=3, help="timed lenet epochs per case (median reported)")
    parser.add_argument("--batches", type=int, default=40, help="timed conventional batches per case")
    parser.add_argument("--workers", default="0,2", help="DataLoader worker counts to try")
    parser.add_argument("--out", type=Path, default=None, help="write a Markdown table here")
    args = parser.parse_args()
    cpu_math(0)
    rows = []
    for name, values in CASES.items():
        config = RunConfig.from_dict({**values, "data": "folder", "data_dir": args.data_dir, "device": "cpu"})
        ours, load_s = bench_lenet(config, args.epochs)
        theirs = {w: bench_conventional(config, int(w), args.batches) for w in args.workers.split(",")}
        best = max(theirs, key=theirs.get)
        rows.append(
            f"| {name} | {ours:,.0f} | {theirs[best]:,.0f} (workers={best}) | {ours / theirs[best]:.1f}x "
            f"| {load_s:.2f} |"
        )
        print(rows[-1], {k: round(v) for k, v in theirs.items()}, flush=True)
    table = "\n".join(
        [
            "| case | lenet img/s | torchvision DataLoader img/s | ratio | lenet data load s |",
            "|---|---|---|---|---|",
            *rows,
        ]
    )
    text = f"Machine: {machine()}\n\n{table}\n"
    print(text)
    if args.out:
        args.out.write_text(
            args.out.read_text().split("<!-- results -->")[0] + "<!-- results -->\n" + text
            if args.out.exists()
            else text
        )


if __name__ == "__main__":
    main()
