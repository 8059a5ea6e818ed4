"""`train(config, logger) -> summary`: one LeNet-5 run, from config to metrics and checkpoints."""

from __future__ import annotations

import copy
import fcntl
import hashlib
import io
import math
import os
import platform
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ablation.config import RunConfig
from ablation.data import (
    VIEWS,
    Batches,
    Dataset,
    channel_stats,
    check_split,
    cutout,
    fixed_subset,
    load_dataset,
    mix_batch,
    reachable_views,
    split_train_val,
    take_views,
    tta_views,
    view_params,
)
from ablation.errors import CheckpointError, ConfigError, OutputError, missing_or_wrong
from ablation.metrics import (
    BEST_TRAIN_ACC,
    BEST_TRAIN_LOSS,
    BEST_VAL_ACC,
    BEST_VAL_LOSS,
    EPOCH_METRICS,
    GAP_TRAIN_VAL,
    TEACHER_ARCH,
    TEACHER_EPOCHS,
    TEACHER_PARAMS,
    TEACHER_S,
    TEACHER_TABLE_S,
    TEACHER_TEST_ACC,
    TEACHER_TRAIN_S,
    TEACHER_VAL_ACC,
    TEST_ACC,
    TEST_LOSS,
    THRESHOLDS,
    TOTAL_S,
    TRAIN_ACC,
    TRAIN_CLEAN_ACC,
    TRAIN_LOSS,
    VAL_ACC,
    VAL_LOSS,
    epoch_metrics,
    epochs_to,
)
from ablation.model import ARCH_NAMES, build_model, count_parameters
from ablation.paths import output_error, write_bytes
from ablation.states import DIVERGED, FINISHED, RUNNING, STOPPED, STOPPED_EARLY
from ablation.tracking import Logger

EVAL_BATCH = 1024  # images per evaluation batch; memory only, results do not depend on it
CLEAN_SUBSET = 5000  # training images (fixed by split_seed) whose clean accuracy is logged every epoch
TABLE_STAGE = "teacher view table"  # the progress stage of computing it (counted in views)
EMA_WARMUP = 10  # the EMA's decay is min(ema, (1 + n) / (EMA_WARMUP + n)) at update n (TensorFlow's num_updates)


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda when a GPU is visible, else cpu; `cuda` without a GPU is an error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA GPU is visible; use device=auto or device=cpu")
    return torch.device("cuda" if name != "cpu" and torch.cuda.is_available() else "cpu")


def cpu_threads(requested: int) -> int:
    """Threads for CPU math: `requested`, else the cores this process may run on (not the machine's)."""
    return requested or len(os.sched_getaffinity(0))


def cpu_math(threads: int) -> None:
    """Set this process's CPU math: `threads` (cpu_threads) and subnormal floats flushed to zero."""
    torch.set_num_threads(cpu_threads(threads))
    # Filters whose gradient vanished decay into subnormal floats, which x86 CPUs compute ~20x slower: an RMSprop
    # lr-0.1 run reached 256 s an epoch instead of 11 s (optim sweep 97b6a3b8-087, epoch 13: 7 conv filters dead;
    # benchmarks/subnormal.py). Only values below 1.2e-38 change.
    for dtype in (np.float16, np.float32, np.float64, np.longdouble):
        np.finfo(dtype)  # numpy caches these; first computed under the flush, they warn that subnormals are zero
    torch.set_flush_denormal(True)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32; `auto` means bf16 on CUDA, fp32 on CPU."""
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("precision=fp16 needs a CUDA GPU; use precision=bf16 or fp32 on CPU")
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def memory_format(config: RunConfig) -> torch.memory_format:
    """channels_last unless batch norm: measured on 2 CPU cores, channels_last is ~1.5x faster without
    batch norm and ~1.4x slower with it (PyTorch's CPU batch norm is slow in that layout)."""
    return torch.contiguous_format if config.norm == "batch" else torch.channels_last


def make_optimizer(model: nn.Module, config: RunConfig) -> torch.optim.Optimizer:
    """The optimiser; weight decay applies to conv/fc weights only, never to biases or norm scales."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    name, lr = config.optimizer, config.lr
    if name in ("sgd", "momentum", "nesterov"):
        momentum = 0.0 if name == "sgd" else config.momentum
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=name == "nesterov" and momentum > 0)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr)  # coupled L2: decay is added to the gradient
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)  # decoupled: weights shrink by lr * wd each step
    return torch.optim.RMSprop(groups, lr=lr)  # coupled L2


def lr_factor(step: int, total: int, warmup: int, schedule: str, drops: tuple[float, ...] = (0.5, 0.75)) -> float:
    """Multiplier on the peak lr at optimiser step `step` of `total` (after `warmup` linear steps); schedule=step
    drops it x0.1 at each fraction of `drops` (`RunConfig.step_drops`) of the steps after the warm-up."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)  # progress through the schedule, 0 -> 1
    if schedule == "step":
        return 0.1 ** sum(t >= d for d in drops)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * t))
    if schedule == "onecycle":  # linear up to the peak at 25%, then linear down to 0
        return max(0.04, t / 0.25) if t < 0.25 else (1 - t) / 0.75
    return 1.0


def predict(
    model: nn.Module, x: torch.Tensor, dtype: torch.dtype | None, tta: str = "none", pad: str = "reflect"
) -> torch.Tensor:
    """Logits of a batch: with test-time augmentation, the weighted mean of its views' logits (`tta_views`);
    logits, not probabilities, are averaged, so the loss reported is the cross-entropy of the averaged logits."""
    out: torch.Tensor | None = None
    for weight, view in tta_views(x, tta, pad):
        with _autocast(x.device, dtype):
            logits = model(view)
        logits = logits if tta == "none" else weight * logits.float()
        out = logits if out is None else out + logits
    assert out is not None
    return out


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: Batches, dtype: torch.dtype | None, tta: str = "none", pad: str = "reflect"
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy (%) over `batches`, in eval mode (with `tta`: of the averaged logits, its
    shifted views padded as `pad`)."""
    model.eval()
    loss = torch.zeros((), device=batches.images.device)
    correct = torch.zeros((), device=batches.images.device)
    for x, y in batches:
        out = predict(model, x, dtype, tta, pad)
        loss += F.cross_entropy(out.float(), y, reduction="sum")
        correct += (out.argmax(1) == y).sum()
    n = len(batches.labels)
    return loss.item() / n, 100.0 * correct.item() / n


def _autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


class WeightEma:
    """An exponential moving average of a model's parameters and buffers, updated after every optimiser step.

    Batch-norm running statistics are averaged like the weights (as timm's ModelEma and torch's AveragedModel
    with use_buffers=True): no extra pass over the data, and with the decay near 1 the averaged statistics
    track the averaged weights' own closely; integer buffers (batches seen) are copied. The decay warms up as
    min(decay, (1 + n) / (10 + n)) at update n (TensorFlow's num_updates), so early epochs are not dominated by
    the random initial weights."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.model = copy.deepcopy(model)
        self.model.requires_grad_(False)
        self.decay, self.updates = decay, 0
        pairs = list(zip([*self.model.parameters(), *self.model.buffers()], [*model.parameters(), *model.buffers()]))
        self.floats = [list(t) for t in zip(*[p for p in pairs if p[0].is_floating_point()])]
        self.others = [p for p in pairs if not p[0].is_floating_point()]

    @torch.no_grad()
    def update(self) -> None:
        """Move the average towards the model's current weights (no host sync)."""
        decay = min(self.decay, (1 + self.updates) / (EMA_WARMUP + self.updates))
        torch._foreach_lerp_(self.floats[0], self.floats[1], 1.0 - decay)
        for mine, theirs in self.others:
            mine.copy_(theirs)
        self.updates += 1


@dataclass
class Teacher:
    """A trained network, in eval mode and without gradients, whose logits the student is distilled towards."""

    model: nn.Module
    scale: torch.Tensor | None  # student-normalised -> teacher-normalised images: x * scale + shift
    shift: torch.Tensor | None
    table: torch.Tensor | None = None  # precomputed logits: train image x column of its view x class
    columns: torch.Tensor | None = None  # view id -> column of `table`
    facts: dict[str, Any] = field(default_factory=dict)  # its cost and accuracy for the student's summary
    dtype: torch.dtype | None = None  # its autocast (`teacher_precision`); None = fp32

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's logits (as fp32) of the student's (augmented, normalised) batch."""
        if self.scale is not None:
            x = x * self.scale + self.shift
        return predict(self.model, x.contiguous(memory_format=torch.channels_last), self.dtype).float()

    def lookup(self, idx: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
        """The precomputed logits of training images `idx` in views `view` (see `view_table`)."""
        assert self.table is not None and self.columns is not None
        return self.table[idx, self.columns[view]]


def view_table(
    teacher: Teacher,
    train_b: Batches,
    stop_now: Callable[[], bool] | None = None,
    views: list[int] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor | None:
    """The teacher's logits of every training image in every view its `augment` mode can produce (crop offset x
    mirror: up to 162): N x views x classes, so a run without cutout/mixup/cutmix looks up the logits of its exact
    augmented batch instead of running the teacher at every step. None when `stop_now` cut it short. `views` (a
    subset of those ids) times a part of it (scripts/teacher_precision.py); `progress(done, total)` after each view."""
    n, device = len(train_b.labels), train_b.images.device
    views = reachable_views(train_b.augment) if views is None else views
    table: torch.Tensor | None = None
    for column, view in enumerate(views):
        for start in range(0, n, EVAL_BATCH):
            if stop_now is not None and stop_now():
                return None
            idx = torch.arange(start, min(n, start + EVAL_BATCH), device=device)
            x = train_b.normalise(take_views(train_b.images, idx, *view_params(view, len(idx), device), train_b.fill))
            logits = teacher.logits(x)
            if table is None:
                table = torch.empty(n, len(views), logits.shape[1], device=device)
            table[idx, column] = logits
        if progress is not None:
            progress(column + 1, len(views))
    assert table is not None
    return table


def cached_view_table(
    config: RunConfig,
    dataset: Dataset,
    teacher: Teacher,
    train_b: Batches,
    stop_now: Callable[[], bool] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> bool:
    """Fill `teacher.table` from a file next to the teacher checkpoint, computing and writing it (best effort,
    atomically, one process at a time; `progress` as in `view_table`) when it is missing: the runs of a sweep share
    one table. False when `stop_now` cut the wait or the computation short."""
    path = Path(config.teacher)
    stat = path.stat()
    key = f"{stat.st_size}|{stat.st_mtime_ns}|{dataset.name}|{config.split_seed}|{config.val_size}"
    key += f"|{train_b.augment}|{teacher.dtype}|{len(train_b.labels)}"
    key += "" if train_b.fill is None else f"|fill={train_b.fill.view(-1).tolist()}"  # older tables: mirror only
    cache = path.with_name(f"{path.name}.views-{hashlib.sha1(key.encode()).hexdigest()[:12]}.pt")
    device = train_b.images.device
    with _file_lock(cache.with_suffix(".lock"), stop_now) as locked:
        table, seconds = _read_table(cache, device) if locked else (None, None)
        computed = locked and table is None
        if computed:
            tick = time.perf_counter()
            table = view_table(teacher, train_b, stop_now, progress=progress)
            seconds = time.perf_counter() - tick
        if table is None:
            return False
        if computed:
            buffer = io.BytesIO()
            torch.save({"table": table.cpu(), "seconds": seconds}, buffer)
            with suppress(OutputError):  # a read-only folder or full disk only means computing it again next time
                write_bytes(cache, buffer.getvalue(), "teacher view table")
    views = reachable_views(train_b.augment)
    columns = torch.full((VIEWS,), -1, dtype=torch.int64)
    columns[views] = torch.arange(len(views))
    teacher.table, teacher.columns = table, columns.to(device)
    if seconds is not None:  # tables written before their cost was recorded have none
        teacher.facts[TEACHER_TABLE_S] = seconds
    return True


def _read_table(path: Path, device: torch.device) -> tuple[torch.Tensor | None, float | None]:
    """A stored view table and the seconds it took to compute; (None, None) when it must be computed."""
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except Exception:  # missing, or damaged (a crash cannot leave a partial file; a disk error can): recompute
        return None, None
    return payload["table"], payload.get("seconds")


@contextmanager
def _file_lock(path: Path, stop_now: Callable[[], bool] | None = None) -> Iterator[bool]:
    """An exclusive lock on `path` (created) while computing a shared file, polled so that a stop request ends
    the wait (yields False); no lock where the file cannot be created (yields True)."""
    try:
        handle = open(path, "a")
    except OSError:
        yield True
        return
    with handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if stop_now is not None and stop_now():
                    yield False
                    return
                time.sleep(0.5)
        yield True


def teacher_checkpoint(config: RunConfig, dataset: Dataset) -> tuple[dict[str, Any], RunConfig] | None:
    """The checkpoint and config of the teacher `config.teacher` names (None without one or at distill_weight=0).
    It must have been trained on the same data and split, or the student's validation images would be in the
    teacher's training set; checked as soon as the data is loaded, before a run starts."""
    if not config.distilling:
        return None
    path = Path(config.teacher)
    try:
        payload = load_checkpoint(path)
    except CheckpointError as exc:
        raise CheckpointError(f"teacher={path}: {exc}") from None
    tconf = checkpoint_config(path, payload)
    if (payload["dataset"], tconf.split_seed, tconf.val_size) != (dataset.name, config.split_seed, config.val_size):
        raise CheckpointError(
            f"teacher {path} was trained on {payload['dataset']} with split_seed={tconf.split_seed}, "
            f"val_size={tconf.val_size}, but this run holds out split_seed={config.split_seed}, "
            f"val_size={config.val_size} of {dataset.name}: its validation images could be in the teacher's "
            "training set; train the teacher on the same data, split_seed and val_size"
        )
    return payload, tconf


def load_teacher(config: RunConfig, dataset: Dataset, train_b: Batches, device: torch.device) -> Teacher | None:
    """The teacher network of `config` (see `teacher_checkpoint`), on `device`, in eval mode, without gradients."""
    found = teacher_checkpoint(config, dataset)
    if found is None:
        return None
    payload, tconf = found
    path = Path(config.teacher)
    # channels_last whatever its norm: in eval mode batch norm is an affine map, and a ResNet-8's forward pass
    # ran ~4x faster so on one CPU thread (batch norm's slow channels_last path is a training-mode cost)
    model = build_model(tconf, len(payload["classes"])).to(device, memory_format=torch.channels_last)
    load_weights(model, payload, path, tconf)
    facts = teacher_facts(path, payload, tconf, count_parameters(model))  # counted while still trainable
    model.eval().requires_grad_(False)
    mean, std = (payload[k].float().view(1, 3, 1, 1).to(device) for k in ("mean", "std"))
    precision = config.precision if config.teacher_precision == "auto" else config.teacher_precision
    dtype = autocast_dtype(precision, device)
    if torch.equal(mean, train_b.mean) and torch.equal(std, train_b.std):
        return Teacher(model, None, None, facts=facts, dtype=dtype)
    return Teacher(model, train_b.std / std, (train_b.mean - mean) / std, facts=facts, dtype=dtype)


def teacher_facts(path: Path, payload: dict[str, Any], tconf: RunConfig, params: int) -> dict[str, Any]:
    """The teacher's architecture, size, epochs, best val accuracy and, from the last.pt its finished run left
    beside best.pt, its test accuracy and training time (s); NaN where that file is gone or cut short."""
    final: dict[str, Any] = {}
    with suppress(CheckpointError):
        last = load_checkpoint(path.with_name("last.pt"))
        if last["config"] == payload["config"]:  # the same run's (a cut-short one's holds no test/acc)
            final = last["metrics"]
    return {
        TEACHER_ARCH: tconf.arch,
        TEACHER_PARAMS: params,
        TEACHER_EPOCHS: tconf.epochs,
        TEACHER_VAL_ACC: float(payload["metrics"].get(BEST_VAL_ACC, math.nan)),
        TEACHER_TEST_ACC: float(final.get(TEST_ACC, math.nan)),
        TEACHER_TRAIN_S: float(final.get(TOTAL_S, math.nan)),
    }


@dataclass
class Trainer:
    """The state of one run's optimisation; `epoch()` runs one pass over the training batches."""

    config: RunConfig
    model: nn.Module
    batches: Batches
    dtype: torch.dtype | None
    logger: Logger
    stop_now: Callable[[], bool] | None = None  # asked before every batch: a prompt stop (SIGTERM, Ctrl-C)
    teacher: Teacher | None = None
    optimizer: torch.optim.Optimizer = field(init=False)
    scheduler: torch.optim.lr_scheduler.LambdaLR = field(init=False)

    def __post_init__(self) -> None:
        c = self.config
        self.optimizer = make_optimizer(self.model, c)
        steps = len(self.batches) * c.epochs
        warmup, drops = round(c.warmup_epochs * len(self.batches)), c.step_drops()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, steps, warmup, c.schedule, drops)
        )
        self.scaler = torch.amp.GradScaler(enabled=self.dtype == torch.float16)
        self.weights = [p for p in self.model.parameters() if p.ndim > 1]
        self.ema = WeightEma(self.model, c.ema) if c.ema > 0 else None

    @property
    def evaluated(self) -> nn.Module:
        """The weights that are evaluated and checkpointed: the EMA's when `ema` is on, else the model's."""
        return self.ema.model if self.ema is not None else self.model

    def augment(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Cutout, then mixup/cutmix: (images, partner labels, weight of the own label), the last two None
        without mixing. Draws come from the batch stream's generator, so they are reproducible and resumable."""
        c, gen = self.config, self.batches.gen
        if c.cutout > 0:
            x = cutout(x, c.cutout, gen)
        if c.mixup > 0 or c.cutmix > 0:
            return mix_batch(x, y, c.mixup, c.cutmix, gen)
        return x, None, None

    def hard_loss(
        self, out: torch.Tensor, y: torch.Tensor, other: torch.Tensor | None, lam: torch.Tensor | None
    ) -> torch.Tensor:
        """Cross-entropy with the (smoothed) labels; for mixed images lam * CE(own) + (1 - lam) * CE(partner)."""
        smoothing = self.config.label_smoothing
        if other is None or lam is None:
            return F.cross_entropy(out.float(), y, label_smoothing=smoothing)
        own = F.cross_entropy(out.float(), y, label_smoothing=smoothing, reduction="none")
        partner = F.cross_entropy(out.float(), other, label_smoothing=smoothing, reduction="none")
        return (lam * own + (1 - lam) * partner).mean()

    def distill_loss(self, x: torch.Tensor, out: torch.Tensor, looked_up: torch.Tensor | None = None) -> torch.Tensor:
        """T^2 * KL(softmax(teacher / T) || softmax(student / T)), batch mean (Hinton et al. 2015); the teacher's
        logits are `looked_up` (precomputed for this batch's views) or computed on `x`."""
        assert self.teacher is not None
        t = self.config.distill_temperature
        logits = self.teacher.logits(x) if looked_up is None else looked_up
        target = F.log_softmax(logits / t, dim=1)
        kl = F.kl_div(F.log_softmax(out.float() / t, dim=1), target, reduction="batchmean", log_target=True)
        return t * t * kl

    def step(
        self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor | None = None, view: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimiser step; returns the batch's summed loss and correct count (on device, no sync).
        The loss is the hard-label cross-entropy (without the l1 and distillation terms); on mixed images
        a prediction counts as correct when it is the label with the larger weight."""
        c = self.config
        x, other, lam = self.augment(x, y)
        with _autocast(x.device, self.dtype):
            out = self.model(x)
        loss = self.hard_loss(out, y, other, lam)
        objective = loss
        if self.teacher is not None:
            weight = c.distill_weight
            looked_up = self.teacher.lookup(idx, view) if self.teacher.table is not None and idx is not None else None
            objective = (1 - weight) * loss + weight * self.distill_loss(x, out, looked_up)
        if c.l1 > 0:
            objective = objective + c.l1 * sum(w.abs().sum() for w in self.weights)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(objective).backward()
        if c.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update()
        target = y if other is None or lam is None else torch.where(lam >= 0.5, y, other)
        return loss.detach() * len(y), (out.argmax(1) == target).sum()

    def resume_state(self, record: Record) -> dict[str, Any]:
        """Everything besides the weights that an interrupted run needs to continue exactly."""
        ema = {"train_model": self.model.state_dict(), "ema_updates": self.ema.updates} if self.ema else {}
        return {
            **ema,  # with EMA, the checkpoint's "model" holds the average and these the trained weights
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "data_rng": self.batches.gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],  # dropout on GPU
            "record": record.dump(),
        }

    def skip(self, epochs: int) -> None:
        """Make the random draws (data order, crops, flips, cutout, mixing) of `epochs` epochs without training."""
        for _ in range(epochs):
            for x, y, _, _ in self.batches.views():
                self.augment(x, y)

    def epoch(self) -> tuple[float, float, int] | None:
        """Train one epoch: (mean loss, accuracy %, images seen), or None when `stop_now` cut it short;
        stats are synced once, at the end."""
        self.model.train()
        total_loss = torch.zeros((), device=self.batches.images.device)
        total_correct = torch.zeros((), device=self.batches.images.device)
        seen = 0
        for i, (x, y, idx, view) in enumerate(self.batches.views()):
            if self.stop_now is not None and self.stop_now():
                return None
            loss, correct = self.step(x, y, idx, view)
            total_loss += loss
            total_correct += correct
            seen += len(y)
            self.logger.progress(i + 1, len(self.batches))
        return total_loss.item() / seen, 100.0 * total_correct.item() / seen, seen


def prepare(config: RunConfig, dataset: Dataset, device: torch.device) -> tuple[Batches, Batches, Batches]:
    """Train/val/test batch streams, all uint8-resident on `device`, normalised with train-split stats."""
    check_split(config, dataset)
    train_x, train_y, val_x, val_y = split_train_val(dataset, config.val_size, config.split_seed)
    mean, std = channel_stats(train_x)
    gen = torch.Generator(device=device).manual_seed(config.seed)

    def stream(x: torch.Tensor, y: torch.Tensor, train: bool) -> Batches:
        return Batches(
            x.to(device).contiguous(),
            y.to(device),
            mean.to(device),
            std.to(device),
            config.batch_size if train else EVAL_BATCH,
            config.augment if train else "none",
            shuffle=train,
            drop_last=train,
            memory_format=memory_format(config),
            gen=gen,
            fill=mean.round().to(torch.uint8).to(device) if config.pad == "mean" and train else None,
        )

    return stream(train_x, train_y, True), stream(val_x, val_y, False), stream(dataset.test_x, dataset.test_y, False)


def clean_stream(train_b: Batches, split_seed: int) -> Batches:
    """A fixed subset (CLEAN_SUBSET images, by `split_seed`) of the training split, unaugmented, in eval-sized
    batches: its accuracy in eval mode is the fitting of the training data without augmentation's handicap."""
    idx = fixed_subset(len(train_b.labels), CLEAN_SUBSET, split_seed).to(train_b.images.device)
    return Batches(
        train_b.images[idx],
        train_b.labels[idx],
        train_b.mean,
        train_b.std,
        EVAL_BATCH,
        memory_format=train_b.memory_format,
    )


def train(
    config: RunConfig,
    logger: Logger,
    checkpoint_dir: Path | None = None,
    dataset: Dataset | None = None,
    resume: bool = False,
    should_stop: Callable[[], bool] | None = None,
    stop_now: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Train one run; log every epoch; return the summary (test metrics are of the best-val checkpoint).

    With `checkpoint_dir`, best.pt and a resumable last.pt are written every epoch; `resume` continues
    from last.pt. `should_stop` is asked after every epoch (sweep stops, hyperband), `stop_now` before every
    batch (signals): either ends the run as `stopped`. An epoch cut short is dropped (not logged, and last.pt
    keeps the last whole epoch, so a resume is still exact)."""
    start = time.perf_counter()
    device = resolve_device(config.device)
    cpu_math(config.threads)
    dtype = autocast_dtype(config.precision, device)
    dataset = dataset or load_dataset(config)
    train_b, val_b, test_b = prepare(config, dataset, device)
    clean_b = clean_stream(train_b, config.split_seed)
    tick = time.perf_counter()
    teacher = load_teacher(config, dataset, train_b, device)  # before seeding: building it draws initial weights
    tabled = True
    if teacher is not None and config.teacher_logits == "precomputed":
        shown = partial(logger.progress, stage=TABLE_STAGE)  # a table takes minutes on a CPU: say so
        tabled = cached_view_table(config, dataset, teacher, train_b, stop_now, shown)
    teacher_s = time.perf_counter() - tick
    torch.manual_seed(config.seed)
    model = build_model(config, len(dataset.classes)).to(device, memory_format=memory_format(config))
    trainer = Trainer(config, model, train_b, dtype, logger, stop_now, teacher)
    net = trainer.evaluated  # what is evaluated and checkpointed (the EMA of the weights when `ema` > 0)
    record = Record(config)
    last = checkpoint_dir / "last.pt" if checkpoint_dir else None
    first = restore(last, config, trainer, record) + 1 if resume and last else 1
    cut_short = False
    if not tabled:  # stopped while the teacher's table was waited for or computed: no epoch to run
        record.state, cut_short, first = STOPPED, True, config.epochs + 1
    for epoch in range(first, config.epochs + 1):
        tick = time.perf_counter()
        result = trainer.epoch()
        if result is None:
            record.state, cut_short = STOPPED, True
            break
        train_loss, train_acc, seen = result
        val_loss, val_acc = evaluate(net, val_b, dtype, config.tta, config.pad)
        _, clean_acc = evaluate(net, clean_b, dtype, config.tta, config.pad)
        seconds = time.perf_counter() - tick
        lr = trainer.scheduler.get_last_lr()[0]
        images = seen + len(val_b.labels) + len(clean_b.labels)
        metrics = epoch_metrics(train_loss, train_acc, clean_acc, val_loss, val_acc, lr, seconds, images)
        logger.log(metrics, epoch)
        if record.add(epoch, metrics, net) and checkpoint_dir:
            best = checkpoint(net, config, dataset, record.summary(), epoch, train_b)
            write_checkpoints({checkpoint_dir / "best.pt": best})
        stop = record.should_stop(lambda: bool(stop_now and stop_now()) or bool(should_stop and should_stop()))
        if last:
            resume_state = trainer.resume_state(record)
            write_checkpoints({last: checkpoint(net, config, dataset, record.summary(), epoch, train_b, resume_state)})
        if stop:
            break
    summary = record.finish(net, test_b, dtype, start)
    summary.update(
        dataset=dataset.name,
        params=count_parameters(model),
        device=str(device),
        threads=torch.get_num_threads(),
        torch=str(torch.__version__),
        python=platform.python_version(),
        **({**teacher.facts, TEACHER_S: teacher_s} if teacher is not None else {}),
    )
    if last and not cut_short:  # the weights of a cut-short epoch are not a resumable state
        final = checkpoint(net, config, dataset, summary, record.last_epoch, train_b, trainer.resume_state(record))
        write_checkpoints({last: final})
    logger.summary(summary)
    return summary


def resumable(path: Path, config: RunConfig) -> dict[str, Any] | None:
    """last.pt's contents if it can continue this run (same settings but threads/device, resume state kept)."""
    if not path.exists():
        return None
    payload = load_checkpoint(path)
    if "resume" not in payload or _identity(payload["config"]) != _identity(config.to_dict()):
        return None  # a different run's checkpoint, or a final one without optimiser state: start afresh
    return payload


def _identity(values: dict[str, Any]) -> dict[str, Any] | None:
    """A stored config with the settings added since filled in (at their defaults), less threads and device."""
    try:
        full = RunConfig.from_dict(values).to_dict()
    except ConfigError:
        return None
    return {k: v for k, v in full.items() if k not in ("threads", "device")}


def restore(path: Path, config: RunConfig, trainer: Trainer, record: Record) -> int:
    """Load a resumable last.pt into the trainer and record; returns the epoch it ended (0: start afresh)."""
    payload = resumable(path, config)
    if payload is None:
        return 0
    state = payload["resume"]
    trainer.model.load_state_dict(state.get("train_model", payload["model"]))
    if trainer.ema is not None:
        trainer.ema.model.load_state_dict(payload["model"])
        trainer.ema.updates = state["ema_updates"]
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    if state["data_rng"].numel() == trainer.batches.gen.get_state().numel():
        trainer.batches.gen.set_state(state["data_rng"])
    else:  # saved on another device type, whose generator this one cannot load: draw the epochs already run, so
        trainer.skip(payload["epoch"])  # the order goes on as a run on this device type would have drawn it
    torch.set_rng_state(state["torch_rng"])
    if state.get("cuda_rng") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    record.load(state["record"])
    return payload["epoch"]


@dataclass
class Record:
    """Per-epoch bookkeeping: best epoch (by val acc), convergence epochs, divergence, early stopping."""

    config: RunConfig
    history: list[dict[str, float]] = field(default_factory=list)
    best: dict[str, float] = field(default_factory=dict)
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)
    reached: dict[int, int] = field(default_factory=dict)
    state: str = RUNNING
    stale: int = 0  # epochs since val loss last improved
    lowest_val_loss: float = math.inf

    def add(self, epoch: int, metrics: dict[str, float], model: nn.Module) -> bool:
        """Record an epoch; True when it is the new best (so its weights were kept)."""
        self.history.append({**metrics, "epoch": epoch})
        if not all(math.isfinite(metrics[k]) for k in (TRAIN_LOSS, VAL_LOSS)):
            self.state = DIVERGED
            return False
        for threshold in THRESHOLDS:
            if metrics[VAL_ACC] >= threshold:
                self.reached.setdefault(threshold, epoch)
        self.stale = 0 if metrics[VAL_LOSS] < self.lowest_val_loss else self.stale + 1
        self.lowest_val_loss = min(self.lowest_val_loss, metrics[VAL_LOSS])
        key = (metrics[VAL_ACC], -metrics[VAL_LOSS])
        if self.best and key <= (self.best[VAL_ACC], -self.best[VAL_LOSS]):
            return False
        self.best = {**metrics, "epoch": epoch}
        self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return True

    def should_stop(self, external: Callable[[], bool] | None = None) -> bool:
        """Diverged, val loss not improved for `early_stopping` epochs, or stopped from outside."""
        if self.state == DIVERGED:
            return True
        patience = self.config.early_stopping
        if patience and self.stale >= patience:
            self.state = STOPPED_EARLY
        elif external is not None and external():
            self.state = STOPPED
        return self.state != RUNNING

    @property
    def last_epoch(self) -> int:
        return self.history[-1]["epoch"] if self.history else 0

    def dump(self) -> dict[str, Any]:
        """The bookkeeping as plain data, for a resumable checkpoint."""
        return {
            "history": self.history,
            "best": self.best,
            "best_state": self.best_state,
            "reached": self.reached,
            "stale": self.stale,
            "lowest_val_loss": self.lowest_val_loss,
        }

    def load(self, state: dict[str, Any]) -> None:
        """Continue from `dump()`'s output; the run is running again."""
        for key, value in state.items():
            setattr(self, key, value)
        self.state = RUNNING

    def summary(self) -> dict[str, Any]:
        """The run's results so far (test metrics are added by `finish`)."""
        best = self.best
        out: dict[str, Any] = {
            "state": self.state,
            "epochs_run": len(self.history),
            "best_epoch": best.get("epoch"),
            BEST_VAL_ACC: best.get(VAL_ACC),
            BEST_VAL_LOSS: best.get(VAL_LOSS),
            BEST_TRAIN_ACC: best.get(TRAIN_ACC),
            BEST_TRAIN_LOSS: best.get(TRAIN_LOSS),
            GAP_TRAIN_VAL: best[TRAIN_ACC] - best[VAL_ACC] if best else None,
            "best/train_clean_acc": best.get(TRAIN_CLEAN_ACC),
            # The fitting gap without augmentation's handicap: clean train accuracy - val accuracy, best epoch.
            "gap/clean_train_val_acc": best[TRAIN_CLEAN_ACC] - best[VAL_ACC] if TRAIN_CLEAN_ACC in best else None,
        }
        out.update({epochs_to(t): self.reached.get(t) for t in THRESHOLDS})
        last = self.history[-1] if self.history else {}
        out.update({f"final/{k}": v for k, v in last.items() if k in EPOCH_METRICS})
        return out

    def finish(self, model: nn.Module, test: Batches, dtype: torch.dtype | None, start: float) -> dict[str, Any]:
        """Evaluate the best-val weights on the test set once; close the run's state."""
        if self.state == RUNNING:
            self.state = FINISHED
        if self.best_state:
            best = copy.deepcopy(model)  # the model keeps its last weights for last.pt
            best.load_state_dict(self.best_state)
            test_loss, test_acc = evaluate(best, test, dtype, self.config.tta, self.config.pad)
        else:
            test_loss, test_acc = math.nan, math.nan
        return {
            **self.summary(),
            TEST_LOSS: test_loss,
            TEST_ACC: test_acc,
            TOTAL_S: time.perf_counter() - start,
        }


def checkpoint(
    model: nn.Module,
    config: RunConfig,
    dataset: Dataset,
    metrics: dict[str, Any],
    epoch: int,
    train_b: Batches,
    resume: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A checkpoint's contents: weights, full config, metrics, dataset name and normalisation stats (loadable with
    weights_only); `resume` adds optimiser, schedule, RNG and bookkeeping state so the run can continue exactly."""
    payload = {
        "model": model.state_dict(),
        "config": config.to_dict(),
        "metrics": metrics,
        "dataset": dataset.name,
        "classes": list(dataset.classes),
        "epoch": epoch,
        "mean": train_b.mean.cpu(),
        "std": train_b.std.cpu(),
        "format": 1,
    }
    if resume is not None:
        payload["resume"] = resume
    return payload


def write_checkpoints(payloads: dict[Path, dict[str, Any]]) -> None:
    """Write checkpoints as one: each to a temporary file first, then all renamed, so a failed write (full disk)
    leaves the old files and no temporary; only a kill between two renames (microseconds) mixes epochs, which
    `agent.pack_of` tolerates (it groups a pack's members by the epoch each ended)."""
    buffers = {}
    for path, payload in payloads.items():
        buffers[path] = io.BytesIO()
        torch.save(payload, buffers[path])  # in memory first: torch's file writer turns a full disk into RuntimeError
    done: list[Path] = []
    try:
        for path, buffer in buffers.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.with_suffix(".tmp").write_bytes(buffer.getbuffer())
            done.append(path)
        for path in done:
            path.with_suffix(".tmp").replace(path)
    except BaseException as exc:  # a stop signal may land here too
        for path in buffers:
            with suppress(OSError):
                path.with_suffix(".tmp").unlink(missing_ok=True)
        if isinstance(exc, OSError):
            where = next((p for p in buffers if p not in done), path)
            raise output_error(where, exc, "checkpoint", "choose another --out (lenet train) or LENET_HOME") from None
        raise


# What every checkpoint holds, with the type each entry must have.
CHECKPOINT_KEYS: dict[str, type | tuple[type, ...]] = {
    "model": dict,
    "config": dict,
    "classes": list,
    "mean": torch.Tensor,
    "std": torch.Tensor,
    "epoch": int,
    "dataset": str,
}


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint safely (weights_only=True: no code runs from the file) and check its entries."""
    if Path(path).is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder; pass the path of a best.pt or last.pt in it")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about odd files; the one-line error below says it all
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist; pass the path of a best.pt or last.pt") from None
    except Exception as exc:
        raise CheckpointError(
            f"cannot read checkpoint {path} ({type(exc).__name__}); it is corrupt or not a lenet checkpoint"
        ) from None
    problem = checkpoint_problem(payload)
    if problem:
        raise CheckpointError(
            f"{path} is not a usable lenet checkpoint ({problem}); pass a best.pt or last.pt written by `lenet train`"
        )
    return payload


def checkpoint_problem(payload: Any) -> str | None:
    """What is missing or malformed in a loaded checkpoint, or None."""
    if not isinstance(payload, dict):
        return f"it holds a {type(payload).__name__}, not a mapping"
    problem = missing_or_wrong(payload, CHECKPOINT_KEYS)
    if problem:
        return problem
    if not payload["classes"] or not all(isinstance(c, str) for c in payload["classes"]):
        return "'classes' must be a non-empty list of class names"
    if any(payload[k].numel() != 3 for k in ("mean", "std")):
        return "'mean' and 'std' must hold one value per colour channel"
    return None


def checkpoint_config(path: Path, payload: dict[str, Any]) -> RunConfig:
    """The config a loaded checkpoint was trained with (settings added since at their defaults)."""
    try:
        return RunConfig.from_dict(payload["config"])
    except ConfigError as exc:  # the checkpoint's own config, not the user's overrides, is at fault
        raise CheckpointError(f"checkpoint {path} holds a config this version rejects ({exc})") from None


def load_weights(model: nn.Module, payload: dict[str, Any], path: Path, config: RunConfig) -> None:
    """Load a checkpoint's weights into the network its config builds; a mismatch is one CheckpointError."""
    try:
        model.load_state_dict(payload["model"])
    except (RuntimeError, TypeError, AttributeError) as exc:  # missing, extra, misshapen or non-tensor entries
        first = " ".join(str(exc).split())[:200]
        raise CheckpointError(
            f"checkpoint {path}'s weights do not fit {ARCH_NAMES[config.arch]} with its config ({first}); "
            "it is not a lenet checkpoint"
        ) from None


def evaluate_checkpoint(path: Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate a checkpoint's weights on the test set of its own data, or of the data `overrides` name."""
    payload = load_checkpoint(path)
    checkpoint_config(path, payload)
    config = RunConfig.from_dict({**payload["config"], **(overrides or {})})
    device = resolve_device(config.device)
    cpu_math(config.threads)
    dataset = load_dataset(config)
    classes = tuple(payload["classes"])
    if dataset.classes != classes:
        raise CheckpointError(
            f"checkpoint {path} was trained on the classes {', '.join(classes)}, but {dataset.name} has "
            f"{', '.join(dataset.classes)}; evaluate it on data with the same classes"
        )
    model = build_model(config, len(classes)).to(device, memory_format=memory_format(config))
    load_weights(model, payload, path, config)
    test = Batches(
        dataset.test_x.to(device).contiguous(),
        dataset.test_y.to(device),
        payload["mean"].float().view(1, 3, 1, 1).to(device),
        payload["std"].float().view(1, 3, 1, 1).to(device),
        EVAL_BATCH,
        memory_format=memory_format(config),
    )
    loss, acc = evaluate(model, test, autocast_dtype(config.precision, device), config.tta, config.pad)
    return {
        TEST_LOSS: loss,
        TEST_ACC: acc,
        "dataset": dataset.name,
        "images": len(dataset.test_y),
        "checkpoint_epoch": payload["epoch"],
        "trained_on": payload["dataset"],
    }
