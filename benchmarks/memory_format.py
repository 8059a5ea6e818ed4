"""channels_last vs contiguous (NCHW) for LeNet-5 training steps on CPU, with and without batch norm.

Backs `ablation.train.memory_format`: interleaved repetitions, median images/s per variant.

    python benchmarks/memory_format.py
"""

from __future__ import annotations

import statistics
import time

import torch

from ablation.config import RunConfig
from ablation.data import Batches
from ablation.model import build_model
from ablation.tracking import NullLogger
from ablation.train import Trainer, cpu_math

CASES = {"no BN, batch 512": {"norm": "none", "batch_size": 512}, "modern (BN), batch 128": {}}


def setup(values: dict, layout: torch.memory_format) -> tuple[Trainer, torch.Tensor, torch.Tensor]:
    """A trainer and one fixed batch in `layout`."""
    config = RunConfig.from_dict(values)
    torch.manual_seed(0)
    model = build_model(config).to(memory_format=layout)
    images = torch.zeros(config.batch_size * 4, 3, 32, 32, dtype=torch.uint8)
    batches = Batches(
        images,
        torch.zeros(len(images), dtype=torch.long),
        torch.zeros(1, 3, 1, 1),
        torch.ones(1, 3, 1, 1),
        config.batch_size,
    )
    x = torch.randn(config.batch_size, 3, 32, 32).contiguous(memory_format=layout)
    return Trainer(config, model, batches, None, NullLogger()), x, torch.randint(0, 10, (config.batch_size,))


def main() -> None:
    cpu_math(0)
    layouts = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
    setups = {(case, name): setup(values, layout) for case, values in CASES.items() for name, layout in layouts.items()}
    rates: dict[tuple[str, str], list[float]] = {key: [] for key in setups}
    for _ in range(7):  # interleaved, so drifting machine load hits every variant alike
        for key, (trainer, x, y) in setups.items():
            tick = time.perf_counter()
            for _ in range(15):
                trainer.step(x, y)
            rates[key].append(15 * len(y) / (time.perf_counter() - tick))
    print("| case | layout | median img/s (train steps only) |\n|---|---|---|")
    for (case, name), values in rates.items():
        print(f"| {case} | {name} | {statistics.median(values):,.0f} |")


if __name__ == "__main__":
    main()
