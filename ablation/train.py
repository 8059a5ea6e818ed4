"""`train(config, logger) -> summary`: one LeNet-5 run, from config to metrics and checkpoints."""

from __future__ import annotations

import copy
import io
import math
import os
import platform
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ablation.config import RunConfig
from ablation.data import Batches, Dataset, channel_stats, check_split, load_dataset, split_train_val
from ablation.errors import CheckpointError, ConfigError, missing_or_wrong
from ablation.model import build_model, count_parameters
from ablation.paths import output_error
from ablation.tracking import Logger

THRESHOLDS = (50, 60, 70)  # val accuracy (%) whose first epoch is reported as convergence speed
EVAL_BATCH = 1024  # images per evaluation batch; memory only, results do not depend on it


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda when a GPU is visible, else cpu; `cuda` without a GPU is an error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA GPU is visible; use device=auto or device=cpu")
    return torch.device("cuda" if name != "cpu" and torch.cuda.is_available() else "cpu")


def cpu_threads(requested: int) -> int:
    """Threads for CPU math: `requested`, else the cores this process may run on (not the machine's)."""
    return requested or len(os.sched_getaffinity(0))


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


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier on the peak lr at optimiser step `step` of `total` (after `warmup` linear steps)."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)  # progress through the schedule, 0 -> 1
    if schedule == "step":
        return 0.1 ** ((t >= 0.5) + (t >= 0.75))  # x0.1 at 50% and again at 75%
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * t))
    if schedule == "onecycle":  # linear up to the peak at 25%, then linear down to 0
        return max(0.04, t / 0.25) if t < 0.25 else (1 - t) / 0.75
    return 1.0


@torch.no_grad()
def evaluate(model: nn.Module, batches: Batches, dtype: torch.dtype | None) -> tuple[float, float]:
    """Mean cross-entropy and accuracy (%) over `batches`, in eval mode."""
    model.eval()
    loss = torch.zeros((), device=batches.images.device)
    correct = torch.zeros((), device=batches.images.device)
    for x, y in batches:
        with _autocast(x.device, dtype):
            out = model(x)
        loss += F.cross_entropy(out.float(), y, reduction="sum")
        correct += (out.argmax(1) == y).sum()
    n = len(batches.labels)
    return loss.item() / n, 100.0 * correct.item() / n


def _autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


@dataclass
class Trainer:
    """The state of one run's optimisation; `epoch()` runs one pass over the training batches."""

    config: RunConfig
    model: nn.Module
    batches: Batches
    dtype: torch.dtype | None
    logger: Logger
    stop_now: Callable[[], bool] | None = None  # asked before every batch: a prompt stop (SIGTERM, Ctrl-C)
    optimizer: torch.optim.Optimizer = field(init=False)
    scheduler: torch.optim.lr_scheduler.LambdaLR = field(init=False)

    def __post_init__(self) -> None:
        c = self.config
        self.optimizer = make_optimizer(self.model, c)
        steps = len(self.batches) * c.epochs
        warmup = round(c.warmup_epochs * len(self.batches))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, steps, warmup, c.schedule)
        )
        self.scaler = torch.amp.GradScaler(enabled=self.dtype == torch.float16)
        self.weights = [p for p in self.model.parameters() if p.ndim > 1]

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimiser step; returns the batch's summed loss and correct count (on device, no sync)."""
        c = self.config
        with _autocast(x.device, self.dtype):
            out = self.model(x)
        loss = F.cross_entropy(out.float(), y, label_smoothing=c.label_smoothing)
        objective = loss + c.l1 * sum(w.abs().sum() for w in self.weights) if c.l1 > 0 else loss
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(objective).backward()
        if c.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss.detach() * len(y), (out.argmax(1) == y).sum()

    def resume_state(self, record: Record) -> dict[str, Any]:
        """Everything besides the weights that an interrupted run needs to continue exactly."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "data_rng": self.batches.gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],  # dropout on GPU
            "record": record.dump(),
        }

    def epoch(self) -> tuple[float, float, int] | None:
        """Train one epoch: (mean loss, accuracy %, images seen), or None when `stop_now` cut it short;
        stats are synced once, at the end."""
        self.model.train()
        total_loss = torch.zeros((), device=self.batches.images.device)
        total_correct = torch.zeros((), device=self.batches.images.device)
        seen = 0
        for i, (x, y) in enumerate(self.batches):
            if self.stop_now is not None and self.stop_now():
                return None
            loss, correct = self.step(x, y)
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
        )

    return stream(train_x, train_y, True), stream(val_x, val_y, False), stream(dataset.test_x, dataset.test_y, False)


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
    torch.set_num_threads(cpu_threads(config.threads))
    dtype = autocast_dtype(config.precision, device)
    dataset = dataset or load_dataset(config)
    train_b, val_b, test_b = prepare(config, dataset, device)
    torch.manual_seed(config.seed)
    model = build_model(config, len(dataset.classes)).to(device, memory_format=memory_format(config))
    trainer = Trainer(config, model, train_b, dtype, logger, stop_now)
    record = Record(config)
    last = checkpoint_dir / "last.pt" if checkpoint_dir else None
    first = restore(last, config, trainer, record) + 1 if resume and last and last.exists() else 1
    cut_short = False
    for epoch in range(first, config.epochs + 1):
        tick = time.perf_counter()
        result = trainer.epoch()
        if result is None:
            record.state, cut_short = "stopped", True
            break
        train_loss, train_acc, seen = result
        val_loss, val_acc = evaluate(model, val_b, dtype)
        seconds = time.perf_counter() - tick
        metrics = {
            "train/loss": train_loss,
            "train/acc": train_acc,
            "val/loss": val_loss,
            "val/acc": val_acc,
            "lr": trainer.scheduler.get_last_lr()[0],
            "time/epoch_s": seconds,
            "throughput/img_s": (seen + len(val_b.labels)) / seconds,
        }
        logger.log(metrics, epoch)
        if record.add(epoch, metrics, model) and checkpoint_dir:
            save_checkpoint(checkpoint_dir / "best.pt", model, config, dataset, record.summary(), epoch, train_b)
        stop = record.should_stop(lambda: bool(stop_now and stop_now()) or bool(should_stop and should_stop()))
        if last:
            save_checkpoint(
                last, model, config, dataset, record.summary(), epoch, train_b, trainer.resume_state(record)
            )
        if stop:
            break
    summary = record.finish(model, test_b, dtype, start)
    summary.update(
        dataset=dataset.name,
        params=count_parameters(model),
        device=str(device),
        threads=torch.get_num_threads(),
        torch=str(torch.__version__),
        python=platform.python_version(),
    )
    if last and not cut_short:  # the weights of a cut-short epoch are not a resumable state
        save_checkpoint(last, model, config, dataset, summary, record.last_epoch, train_b, trainer.resume_state(record))
    logger.summary(summary)
    return summary


def restore(path: Path, config: RunConfig, trainer: Trainer, record: Record) -> int:
    """Load a resumable last.pt into the trainer and record; returns the epoch it ended (0: start afresh)."""
    payload = load_checkpoint(path)
    same = {k: v for k, v in payload["config"].items() if k not in ("threads", "device")}
    if "resume" not in payload or same != {k: v for k, v in config.to_dict().items() if k not in ("threads", "device")}:
        return 0  # a different run's checkpoint, or a final one without optimiser state: start afresh
    state = payload["resume"]
    trainer.model.load_state_dict(payload["model"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    if state["data_rng"].numel() == trainer.batches.gen.get_state().numel():
        trainer.batches.gen.set_state(state["data_rng"])  # else saved on another device type: the data order
        # continues from this generator's seed state (replays epoch 1's order); weights and optimiser are exact
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
    state: str = "running"
    stale: int = 0  # epochs since val loss last improved
    lowest_val_loss: float = math.inf

    def add(self, epoch: int, metrics: dict[str, float], model: nn.Module) -> bool:
        """Record an epoch; True when it is the new best (so its weights were kept)."""
        self.history.append({**metrics, "epoch": epoch})
        if not all(math.isfinite(metrics[k]) for k in ("train/loss", "val/loss")):
            self.state = "diverged"
            return False
        for threshold in THRESHOLDS:
            if metrics["val/acc"] >= threshold:
                self.reached.setdefault(threshold, epoch)
        self.stale = 0 if metrics["val/loss"] < self.lowest_val_loss else self.stale + 1
        self.lowest_val_loss = min(self.lowest_val_loss, metrics["val/loss"])
        key = (metrics["val/acc"], -metrics["val/loss"])
        if self.best and key <= (self.best["val/acc"], -self.best["val/loss"]):
            return False
        self.best = {**metrics, "epoch": epoch}
        self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return True

    def should_stop(self, external: Callable[[], bool] | None = None) -> bool:
        """Diverged, val loss not improved for `early_stopping` epochs, or stopped from outside."""
        if self.state == "diverged":
            return True
        patience = self.config.early_stopping
        if patience and self.stale >= patience:
            self.state = "stopped_early"
        elif external is not None and external():
            self.state = "stopped"
        return self.state != "running"

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
        self.state = "running"

    def summary(self) -> dict[str, Any]:
        """The run's results so far (test metrics are added by `finish`)."""
        best = self.best
        out: dict[str, Any] = {
            "state": self.state,
            "epochs_run": len(self.history),
            "best_epoch": best.get("epoch"),
            "best/val_acc": best.get("val/acc"),
            "best/val_loss": best.get("val/loss"),
            "best/train_acc": best.get("train/acc"),
            "best/train_loss": best.get("train/loss"),
            "gap/train_val_acc": best["train/acc"] - best["val/acc"] if best else None,
        }
        out.update({f"epochs_to/val_acc_{t}": self.reached.get(t) for t in THRESHOLDS})
        last = self.history[-1] if self.history else {}
        out.update(
            {f"final/{k}": v for k, v in last.items() if k in ("train/loss", "train/acc", "val/loss", "val/acc")}
        )
        return out

    def finish(self, model: nn.Module, test: Batches, dtype: torch.dtype | None, start: float) -> dict[str, Any]:
        """Evaluate the best-val weights on the test set once; close the run's state."""
        if self.state == "running":
            self.state = "finished"
        if self.best_state:
            best = copy.deepcopy(model)  # the model keeps its last weights for last.pt
            best.load_state_dict(self.best_state)
            test_loss, test_acc = evaluate(best, test, dtype)
        else:
            test_loss, test_acc = math.nan, math.nan
        return {
            **self.summary(),
            "test/loss": test_loss,
            "test/acc": test_acc,
            "time/total_s": time.perf_counter() - start,
        }


def save_checkpoint(
    path: Path,
    model: nn.Module,
    config: RunConfig,
    dataset: Dataset,
    metrics: dict[str, Any],
    epoch: int,
    train_b: Batches,
    resume: dict[str, Any] | None = None,
) -> None:
    """Weights, full config, metrics, dataset name and normalisation stats (loadable with weights_only);
    `resume` adds optimiser, schedule, RNG and bookkeeping state so the run can continue exactly.
    Written to a temporary file, then renamed: a failed write (full disk) leaves the old file and no temporary."""
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
    buffer = io.BytesIO()
    torch.save(payload, buffer)  # in memory first: torch's own file writer turns a full disk into a RuntimeError
    tmp = path.with_suffix(".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(buffer.getbuffer())
        tmp.replace(path)
    except BaseException as exc:  # a stop signal may land here too
        with suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise output_error(path, exc, "checkpoint", "choose another --out (lenet train) or LENET_HOME") from None
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


def evaluate_checkpoint(path: Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate a checkpoint's weights on the test set of its own data, or of the data `overrides` name."""
    payload = load_checkpoint(path)
    try:
        RunConfig.from_dict(payload["config"])
    except ConfigError as exc:  # the checkpoint's own config, not the user's overrides, is at fault
        raise CheckpointError(f"checkpoint {path} holds a config this version rejects ({exc})") from None
    config = RunConfig.from_dict({**payload["config"], **(overrides or {})})
    device = resolve_device(config.device)
    torch.set_num_threads(cpu_threads(config.threads))
    dataset = load_dataset(config)
    classes = tuple(payload["classes"])
    if dataset.classes != classes:
        raise CheckpointError(
            f"checkpoint {path} was trained on the classes {', '.join(classes)}, but {dataset.name} has "
            f"{', '.join(dataset.classes)}; evaluate it on data with the same classes"
        )
    model = build_model(config, len(classes)).to(device, memory_format=memory_format(config))
    try:
        model.load_state_dict(payload["model"])
    except (RuntimeError, TypeError, AttributeError) as exc:  # missing, extra, misshapen or non-tensor entries
        first = " ".join(str(exc).split())[:200]
        raise CheckpointError(
            f"checkpoint {path}'s weights do not fit LeNet-5 with its config ({first}); it is not a lenet checkpoint"
        ) from None
    test = Batches(
        dataset.test_x.to(device).contiguous(),
        dataset.test_y.to(device),
        payload["mean"].float().view(1, 3, 1, 1).to(device),
        payload["std"].float().view(1, 3, 1, 1).to(device),
        EVAL_BATCH,
        memory_format=memory_format(config),
    )
    loss, acc = evaluate(model, test, autocast_dtype(config.precision, device))
    return {
        "test/loss": loss,
        "test/acc": acc,
        "dataset": dataset.name,
        "images": len(dataset.test_y),
        "checkpoint_epoch": payload["epoch"],
        "trained_on": payload["dataset"],
    }
