"""Metric names, their one owner: the keys `train` and `train_pack` log every epoch (`epoch_metrics`) and write
in a run's summary, which sweep files, W&B, the store and the analysis read back. Imports no torch."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

# Logged every epoch. Accuracies in %, losses are mean cross-entropy (nats).
TRAIN_LOSS = "train/loss"
TRAIN_ACC = "train/acc"  # on the augmented training batches
TRAIN_CLEAN_ACC = "train/clean_acc"  # on a fixed training subset without augmentation
VAL_LOSS = "val/loss"
VAL_ACC = "val/acc"
LR = "lr"  # the learning rate at the end of the epoch
EPOCH_S = "time/epoch_s"  # wall-clock seconds of the epoch, evaluation included
THROUGHPUT = "throughput/img_s"  # images per second, evaluated images included

# Written once in the summary: the best epoch (by val accuracy), the test set (the best-val weights), time.
BEST_VAL_ACC = "best/val_acc"
BEST_VAL_LOSS = "best/val_loss"
BEST_TRAIN_ACC = "best/train_acc"
BEST_TRAIN_LOSS = "best/train_loss"
TEST_ACC = "test/acc"
TEST_LOSS = "test/loss"
GAP_TRAIN_VAL = "gap/train_val_acc"  # train - val accuracy at the best epoch (percentage points)
TOTAL_S = "time/total_s"  # wall-clock seconds of the whole run
THRESHOLDS = (50, 60, 70)  # val accuracy (%) whose first epoch is reported as convergence speed (`epochs_to`)

# A distilled run's summary also describes its teacher, and what setting it up cost the student.
TEACHER_ARCH = "teacher/arch"
TEACHER_PARAMS = "teacher/params"
TEACHER_EPOCHS = "teacher/epochs"
TEACHER_VAL_ACC = "teacher/val_acc"
TEACHER_TEST_ACC = "teacher/test_acc"
TEACHER_TRAIN_S = "teacher/train_s"  # the teacher's own training time (s)
# Computing its view table of precomputed logits (s): once per teacher, data and precision, shared by the runs that
# read it (their own set-up time, TEACHER_S, is then only reading it).
TEACHER_TABLE_S = "teacher/table_s"
TEACHER_S = "time/teacher_s"  # the student's set-up time for its teacher (s): loading it, its view table

# Metrics a sweep may optimise: logged every epoch, or written once in the summary.
EPOCH_METRICS = (VAL_ACC, VAL_LOSS, TRAIN_ACC, TRAIN_LOSS, TRAIN_CLEAN_ACC)
SUMMARY_METRICS = (BEST_VAL_ACC, BEST_VAL_LOSS, TEST_ACC, TEST_LOSS)
# W&B summaries of the per-epoch metrics: the best epoch's value, not the last one, so W&B's sweep table and
# parallel coordinates rank runs as our tables do (best/val_acc, test/acc of the best-val checkpoint).
SUMMARIES = {VAL_ACC: "max", VAL_LOSS: "min"}
# A sweep's default metric; read-only, so a sweep file built from it takes a copy (`dict(OBJECTIVE)`).
OBJECTIVE: Mapping[str, str] = MappingProxyType({"name": VAL_ACC, "goal": "maximize"})


def epochs_to(threshold: int) -> str:
    """The summary key of the first epoch whose val accuracy reached `threshold` (%)."""
    return f"epochs_to/val_acc_{threshold}"


def summary_name(metric: str) -> str:
    """The summary key holding a sweep metric's result: a summary metric itself, else its best epoch's value."""
    return metric if metric.startswith(("best/", "test/")) else "best/" + metric.replace("/", "_")


def epoch_metrics(
    train_loss: float,
    train_acc: float,
    clean_acc: float,
    val_loss: float,
    val_acc: float,
    lr: float,
    seconds: float,
    images: int,
) -> dict[str, float]:
    """One epoch's logged metrics; `seconds` (s) is the epoch's wall-clock time, `images` all it processed."""
    return {
        TRAIN_LOSS: train_loss,
        TRAIN_ACC: train_acc,
        TRAIN_CLEAN_ACC: clean_acc,
        VAL_LOSS: val_loss,
        VAL_ACC: val_acc,
        LR: lr,
        EPOCH_S: seconds,
        THROUGHPUT: images / seconds,
    }
