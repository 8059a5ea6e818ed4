"""What `teacher_precision` costs and changes: a teacher's forward speed and its logits in fp32 and bf16.

Times one pass of the teacher over the first VIEWS crop/flip views of the training split (as `teacher_logits=
precomputed` does for all 162), then compares the two precisions' logits of the validation split: largest
difference, top-1 agreement, accuracy, and the KL divergence between the soft targets at temperature T = 4.
Usage, from the repository root:

    python scripts/teacher_precision.py TEACHER/best.pt ../shared/data/cifar10-jpg.tar.gz [THREADS] [VIEWS]
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from ablation.config import RunConfig
from ablation.data import load_dataset, reachable_views
from ablation.train import EVAL_BATCH, cpu_math, load_teacher, prepare, view_table


def main(checkpoint: str, data_dir: str, threads: int = 2, views: int = 2) -> None:
    cpu_math(threads)
    config = RunConfig(teacher=checkpoint, data_dir=data_dir, precision="fp32")
    dataset = load_dataset(config)
    train_b, val_b, _ = prepare(config, dataset, torch.device("cpu"))
    out = {}
    for precision in ("fp32", "bf16"):
        teacher = load_teacher(replace(config, teacher_precision=precision), dataset, train_b, torch.device("cpu"))
        assert teacher is not None
        n = len(train_b.labels)
        tick = time.perf_counter()
        view_table(teacher, train_b, views=reachable_views(train_b.augment)[:views])
        rate = views * n / (time.perf_counter() - tick)
        starts = range(0, len(val_b.labels), EVAL_BATCH)
        out[precision] = torch.cat([teacher.logits(val_b.normalise(val_b.images[s : s + EVAL_BATCH])) for s in starts])
        acc = (out[precision].argmax(1) == val_b.labels).float().mean().item() * 100
        minutes = 162 * n / rate / 60
        print(f"{precision}: {rate:,.0f} images/s, {threads} threads (162 views: {minutes:.0f} min); val {acc:.2f} %")
    exact, rounded = out["fp32"], out["bf16"]
    t = 4.0
    kl = F.kl_div(F.log_softmax(rounded / t, 1), F.log_softmax(exact / t, 1), reduction="batchmean", log_target=True)
    agree = (exact.argmax(1) == rounded.argmax(1)).float().mean().item() * 100
    print(
        f"bf16 vs fp32 on val: max |logit diff| {(exact - rounded).abs().max().item():.4f}, "
        f"mean {(exact - rounded).abs().mean().item():.4f}; top-1 agreement {agree:.2f} %; KL at T=4 {kl.item():.2e}"
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *(int(a) for a in sys.argv[3:]))
