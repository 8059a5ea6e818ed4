"""Is a CPU run bit-reproducible, and does the thread count change its numbers? Trains the modern recipe three times
(threads=1, threads=1 again, threads=2) for a few epochs and prints val accuracy per epoch and the test accuracy.

    .venv/bin/python scripts/reproducibility.py ../shared/data/cifar10-jpg.tar.gz [EPOCHS]
"""

import sys

from ablation.config import RunConfig
from ablation.tracking import MemoryLogger
from ablation.train import train


def main() -> None:
    """Train the three runs and print one line each."""
    data_dir, epochs = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 3
    for name, threads in (("threads=1", 1), ("threads=1 again", 1), ("threads=2", 2)):
        log = MemoryLogger()
        config = {"preset": "modern", "epochs": epochs, "threads": threads, "device": "cpu", "data_dir": data_dir}
        summary = train(RunConfig.from_dict(config), log)
        curve = " ".join(f"{h['val/acc']:.2f}" for h in log.history)
        print(f"{name:<16} val acc by epoch: {curve}  test acc {summary['test/acc']:.2f}", flush=True)


if __name__ == "__main__":
    main()
