"""Training steps on weights that hold subnormal floats, with and without flushing them (`ablation.train.cpu_math`).

Dead filters get no gradient and decay under weight decay toward zero through the subnormal range, where x86
CPUs compute far slower. This plants dead filters (subnormal, their gradient held at zero) in LeNet-5 as the optim
study's slow runs had them and times whole training steps, interleaved, flush off and on, one thread.

    python benchmarks/subnormal.py
"""

from __future__ import annotations

import platform
import statistics
import time

import torch

from ablation.config import RunConfig
from ablation.data import Batches
from ablation.model import build_model
from ablation.tracking import NullLogger
from ablation.train import Trainer

# The optim study's slow runs were Adam and RMSprop at lr 0.1; their planted state is not stable under their own step
# (an adaptive step divides the decay by sqrt(v) + eps and lifts the weights out of the subnormal range), so the
# modern recipe, whose weight decay keeps dead filters subnormal, carries the measurement.
CASES = {"modern (Nesterov, lr 0.1, wd 5e-4)": {}}
DEAD = (1, 6)  # dead filters of conv1 (of 6) and conv2 (of 16), as in optim run 97b6a3b8-087 at epoch 13
STEPS, REPEATS, BATCH = 4, 3, 128


def planted(values: dict, dead: bool) -> tuple[Trainer, torch.Tensor, torch.Tensor]:
    """A trainer whose LeNet-5 has, if `dead`, DEAD conv filters with no gradient and their weights and optimiser
    state subnormal, as after many steps of decay; and one fixed batch."""
    torch.manual_seed(0)
    config = RunConfig.from_dict(values)
    model = build_model(config)
    images = torch.zeros(BATCH * 4, 3, 32, 32, dtype=torch.uint8)
    labels = torch.zeros(len(images), dtype=torch.long)
    batches = Batches(images, labels, torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1), BATCH)
    trainer = Trainer(config, model, batches, None, NullLogger())
    x, y = torch.randn(BATCH, 3, 32, 32), torch.randint(0, 10, (BATCH,))
    trainer.step(x, y)  # creates the optimiser's state
    with torch.no_grad():
        filters = [p for p in model.parameters() if p.dim() == 4]  # conv1, conv2
        for p, n in zip(filters, DEAD if dead else (0, 0)):
            mask = torch.zeros_like(p, dtype=torch.bool)
            mask[:n] = True  # whole filters die, so their output channels are subnormal too
            p[mask] = 1e-39  # below 1.18e-38: subnormal
            for state in trainer.optimizer.state[p].values():
                if torch.is_tensor(state) and state.shape == p.shape:
                    state[mask] = 1e-39
            p.register_hook(lambda g, mask=mask: g.masked_fill(mask, 0))
    return trainer, x, y


def images_per_s(trainer: Trainer, x: torch.Tensor, y: torch.Tensor, flush: bool) -> float:
    """Images per second of STEPS training steps with subnormal flushing `flush`."""
    torch.set_flush_denormal(flush)
    tick = time.perf_counter()
    for _ in range(STEPS):
        trainer.step(x, y)
    return STEPS * len(y) / (time.perf_counter() - tick)


def main() -> None:
    torch.set_num_threads(1)
    if not torch.set_flush_denormal(True):
        raise SystemExit("this CPU cannot flush subnormal floats: nothing to compare")
    torch.set_flush_denormal(False)  # else planting writes the subnormals as zeros
    # One trainer per variant: a step with the flush on writes the planted subnormals back as zeros.
    variants = [(c, d, f) for c in CASES for d in (False, True) for f in (False, True)]
    setups = {(c, d, f): planted(CASES[c], d) for c, d, f in variants}
    rates: dict[tuple[str, bool, bool], list[float]] = {key: [] for key in setups}
    for _ in range(REPEATS):  # interleaved, so drifting machine load hits every variant alike
        for key, (trainer, x, y) in setups.items():
            rates[key].append(images_per_s(trainer, x, y, key[2]))
    torch.set_flush_denormal(True)
    print(
        f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread, batch {BATCH}\n"
    )
    print("| recipe | dead (subnormal) conv filters | flush | median img/s (training steps) |\n|---|---|---|---|")
    for (case, dead, flush), values in rates.items():
        filters = f"{DEAD[0]} of 6, {DEAD[1]} of 16" if dead else "none"
        print(f"| {case} | {filters} | {'on' if flush else 'off'} | {statistics.median(values):,.0f} |")


if __name__ == "__main__":
    main()
