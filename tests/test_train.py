"""`train(config, logger)` for real, on tiny generated data."""

import math
from pathlib import Path

import pytest
import torch
from conftest import TINY
from typer.testing import CliRunner

from ablation.config import CHOICES, RunConfig
from ablation.model import build_model
from ablation.tracking import MemoryLogger
from ablation.train import Record, evaluate_checkpoint, load_checkpoint, lr_factor, make_optimizer, train
from cli import app


def run(data_dir: Path, checkpoint_dir: Path | None = None, **values) -> tuple[dict, MemoryLogger]:
    config = RunConfig.from_dict({**TINY, "data_dir": str(data_dir), **values})
    logger = MemoryLogger()
    return train(config, logger, checkpoint_dir=checkpoint_dir), logger


CHOICE_CASES = [
    (k, v) for k in ("activation", "pooling", "norm", "init", "optimizer", "schedule", "augment") for v in CHOICES[k]
]


@pytest.mark.parametrize("key,value", CHOICE_CASES, ids=[f"{k}={v}" for k, v in CHOICE_CASES])
def test_every_choice_trains(batches_dir: Path, key: str, value: str) -> None:
    warmup = 0.0 if (key, value) == ("schedule", "onecycle") else 0.5  # onecycle has its own warm-up
    summary, logger = run(
        batches_dir,
        **{
            "lr": 0.01,
            "l1": 1e-5,
            "grad_clip": 1.0,
            "schedule": "cosine",
            "warmup_epochs": warmup,
            "dropout": 0.1,
            key: value,
        },
    )
    assert summary["state"] == "finished" and summary["epochs_run"] == 1
    assert math.isfinite(logger.history[0]["train/loss"]) and 0 <= summary["test/acc"] <= 100


def test_metrics_logged_every_epoch(batches_dir: Path) -> None:
    summary, logger = run(batches_dir, epochs=3)
    assert [h["epoch"] for h in logger.history] == [1, 2, 3]
    assert {"train/loss", "train/acc", "val/loss", "val/acc", "lr", "time/epoch_s", "throughput/img_s"} <= set(
        logger.history[0]
    )
    assert logger.final == summary
    for key in (
        "best_epoch",
        "test/acc",
        "test/loss",
        "gap/train_val_acc",
        "params",
        "time/total_s",
        "epochs_to/val_acc_50",
        "epochs_to/val_acc_70",
    ):
        assert key in summary
    assert summary["dataset"] == "cifar10" and summary["params"] > 60_000


def test_learns_a_learnable_task(folder_dir: Path) -> None:
    summary, logger = run(folder_dir, epochs=8, lr=0.05, batch_size=16)
    assert summary["best/val_acc"] >= 70 and summary["test/acc"] >= 60  # chance is 10%
    assert summary["epochs_to/val_acc_50"] is not None
    best = max(logger.history, key=lambda h: (h["val/acc"], -h["val/loss"]))
    assert summary["best_epoch"] == best["epoch"]


def test_same_seed_same_metrics_on_cpu(batches_dir: Path) -> None:
    a, la = run(batches_dir, epochs=2, seed=3, threads=1)  # same config incl. thread count: bit-identical
    b, lb = run(batches_dir, epochs=2, seed=3, threads=1)
    c, _ = run(batches_dir, epochs=2, seed=4)
    strip = lambda h: [{k: v for k, v in e.items() if not k.startswith(("time", "throughput"))} for e in h]
    assert strip(la.history) == strip(lb.history)
    assert a["test/acc"] == b["test/acc"] and a["test/loss"] == b["test/loss"]
    assert c["test/loss"] != a["test/loss"]


def test_training_flushes_subnormal_floats(batches_dir: Path) -> None:
    """Dead units' weights decay into subnormal floats, ~20x slower on x86 CPUs: training flushes them to zero."""
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush subnormal floats")
    tiny = torch.tensor([1e-30])
    assert (tiny * 1e-10).item() > 0  # a subnormal float (1e-40) without the flush
    run(batches_dir, epochs=1)
    assert (tiny * 1e-10).item() == 0.0


def test_divergence_is_recorded_not_raised(batches_dir: Path) -> None:
    summary, logger = run(batches_dir, epochs=5, preset="classic", activation="relu", lr=1e8, batch_size=8)
    assert summary["state"] == "diverged"
    assert summary["epochs_run"] < 5 and not math.isfinite(logger.history[-1]["train/loss"])


def test_record_early_stopping() -> None:
    record = Record(RunConfig.from_dict({"early_stopping": 2}))
    model = torch.nn.Linear(1, 1)
    losses = [1.0, 0.9, 0.95, 0.92]  # best at epoch 2, then two epochs without improvement
    for epoch, loss in enumerate(losses, 1):
        record.add(epoch, {"train/loss": 1.0, "train/acc": 50.0, "val/loss": loss, "val/acc": 40.0 + epoch}, model)
        stop = record.should_stop()
        assert stop == (epoch == 4)
    assert record.state == "stopped_early" and record.best["epoch"] == 4  # best is by val accuracy


def test_evaluate_checkpoints_and_lenet_test(folder_dir: Path, tmp_path: Path) -> None:
    summary, _ = run(folder_dir, checkpoint_dir=tmp_path / "ckpt", epochs=2)
    best = load_checkpoint(tmp_path / "ckpt" / "best.pt")
    last = load_checkpoint(tmp_path / "ckpt" / "last.pt")
    assert best["config"] == RunConfig.from_dict({**TINY, "data_dir": str(folder_dir), "epochs": 2}).to_dict()
    assert best["dataset"] == "tiny-png" and best["epoch"] == summary["best_epoch"]
    assert last["metrics"]["test/acc"] == summary["test/acc"] and last["epoch"] == 2
    result = evaluate_checkpoint(tmp_path / "ckpt" / "best.pt")
    assert result["test/acc"] == pytest.approx(summary["test/acc"])
    printed = CliRunner().invoke(app, ["test", str(tmp_path / "ckpt" / "best.pt"), "--device", "cpu"])
    assert printed.exit_code == 0 and f"test accuracy {summary['test/acc']:.2f}%" in printed.output, printed.output


def test_schedules() -> None:
    total = 100
    assert [lr_factor(s, total, 0, "constant") for s in (0, 99)] == [1.0, 1.0]
    assert lr_factor(10, total, 0, "step") == 1.0 and lr_factor(60, total, 0, "step") == pytest.approx(0.1)
    assert lr_factor(80, total, 0, "step") == pytest.approx(0.01)
    assert lr_factor(0, total, 0, "cosine") == 1.0 and lr_factor(99, total, 0, "cosine") < 0.01
    assert lr_factor(25, total, 0, "onecycle") == 1.0 and lr_factor(0, total, 0, "onecycle") < 0.1
    assert lr_factor(4, total, 10, "constant") == 0.5  # warm-up is linear


def test_step_milestones_drop_the_lr_after_those_epochs() -> None:
    drops = RunConfig.from_dict({"preset": "bigballon"}).step_drops()  # after epochs 81 and 122 of 200
    steps_per_epoch = 351  # 45,000 images / batch 128, last batch dropped
    total = 200 * steps_per_epoch
    epoch_ends = [e * steps_per_epoch + s for e in (80, 81, 121, 122) for s in (0, 350)]  # first and last steps
    factors = [lr_factor(step, total, 0, "step", drops) for step in epoch_ends]
    assert factors == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.1, 0.1, 0.01, 0.01])


def test_weight_decay_skips_biases_and_norms() -> None:
    config = RunConfig.from_dict({"norm": "batch", "weight_decay": 0.1})
    groups = make_optimizer(build_model(config), config).param_groups
    assert all(p.ndim > 1 for p in groups[0]["params"]) and groups[0]["weight_decay"] == 0.1
    assert all(p.ndim == 1 for p in groups[1]["params"]) and groups[1]["weight_decay"] == 0.0


def test_l1_shrinks_weights(batches_dir: Path, tmp_path: Path) -> None:
    def l1_norm(l1: float) -> float:
        run(
            batches_dir,
            checkpoint_dir=tmp_path / str(l1),
            epochs=2,
            l1=l1,
            norm="none",
            weight_decay=0,
            schedule="constant",
            lr=0.01,
        )
        weights = load_checkpoint(tmp_path / str(l1) / "last.pt")["model"]
        return sum(w.abs().sum().item() for w in weights.values() if w.ndim > 1)

    assert l1_norm(1.0) < 0.5 * l1_norm(0.0)


def test_resume_continues_exactly(batches_dir: Path, tmp_path: Path) -> None:
    straight, full = run(batches_dir, checkpoint_dir=tmp_path / "a", epochs=4, dropout=0.2)
    config = RunConfig.from_dict({**TINY, "data_dir": str(batches_dir), "epochs": 4, "dropout": 0.2})
    first = MemoryLogger()
    stopped = train(config, first, checkpoint_dir=tmp_path / "b", should_stop=lambda: len(first.history) == 2)
    assert stopped["state"] == "stopped" and stopped["epochs_run"] == 2
    second = MemoryLogger()
    resumed = train(config, second, checkpoint_dir=tmp_path / "b", resume=True)
    assert [h["epoch"] for h in second.history] == [3, 4]
    strip = lambda h: [{k: v for k, v in e.items() if not k.startswith(("time", "throughput"))} for e in h]
    assert strip(first.history + second.history) == strip(full.history)
    assert resumed["state"] == "finished" and resumed["test/acc"] == straight["test/acc"]
    assert resumed["epochs_run"] == 4 and resumed["best_epoch"] == straight["best_epoch"]


def test_resume_on_another_device_type_continues_the_data_order_a_run_there_would_draw(
    batches_dir: Path, tmp_path: Path
) -> None:
    straight, full = run(batches_dir, checkpoint_dir=tmp_path / "a", epochs=4, dropout=0.2, cutout=8)
    config = RunConfig.from_dict({**TINY, "data_dir": str(batches_dir), "epochs": 4, "dropout": 0.2, "cutout": 8})
    first = MemoryLogger()
    train(config, first, checkpoint_dir=tmp_path / "b", should_stop=lambda: len(first.history) == 2)
    payload = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    payload["resume"]["data_rng"] = torch.zeros(16, dtype=torch.uint8)  # a CUDA (philox) generator's state
    torch.save(payload, tmp_path / "b" / "last.pt")
    second = MemoryLogger()
    resumed = train(config, second, checkpoint_dir=tmp_path / "b", resume=True)
    assert [h["epoch"] for h in second.history] == [3, 4] and resumed["epochs_run"] == 4
    # epochs 3-4 draw what a run on this device type draws there (not epoch 1's order again): here, the same run
    strip = lambda h: [{k: v for k, v in e.items() if not k.startswith(("time", "throughput"))} for e in h]
    assert strip(second.history) == strip(full.history[2:])
    assert resumed["test/acc"] == straight["test/acc"]
