"""Second-round techniques: test-time augmentation, weight EMA, cutout/mixup/cutmix, distillation from a ResNet
teacher, and the clean-train accuracy; each for real on tiny generated data (tests/conftest.py)."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, lenet

from ablation.config import RunConfig
from ablation.data import (
    VIEWS,
    Batches,
    box_mask,
    cutout,
    fixed_subset,
    load_dataset,
    mix_batch,
    reachable_views,
    sample_beta,
    split_train_val,
    tta_views,
)
from ablation.errors import CheckpointError, ConfigError
from ablation.model import build_model, count_parameters
from ablation.tracking import MemoryLogger
from ablation.train import (
    CLEAN_SUBSET,
    TABLE_STAGE,
    Trainer,
    WeightEma,
    cached_view_table,
    evaluate,
    evaluate_checkpoint,
    load_checkpoint,
    load_teacher,
    predict,
    prepare,
    train,
)
from analysis.tables import teacher_table

# Per-epoch numbers that depend on the wall clock, not on the arithmetic.
TIMING = ("time", "throughput")
SETTINGS = {
    "tta=flip": {"tta": "flip"},
    "tta=flip_crop": {"tta": "flip_crop"},
    "ema": {"ema": 0.9},
    "cutout": {"cutout": 8},
    "mixup": {"mixup": 0.4},
    "cutmix": {"cutmix": 1.0},
    "mixup+cutmix": {"mixup": 0.2, "cutmix": 1.0},
    "resnet8": {"arch": "resnet8"},
}


def config_for(data_dir: Path, **values: object) -> RunConfig:
    return RunConfig.from_dict({**TINY, "data_dir": str(data_dir), "threads": 1, **values})


def run(data_dir: Path, checkpoint_dir: Path | None = None, **values: object) -> tuple[dict, MemoryLogger]:
    logger = MemoryLogger()
    return train(config_for(data_dir, **values), logger, checkpoint_dir=checkpoint_dir), logger


def numbers(summary: dict, logger: MemoryLogger) -> tuple[dict, list[dict]]:
    """A run's results without its timings: equal for runs that did the same arithmetic."""
    keep = lambda d: {k: v for k, v in d.items() if not k.startswith(TIMING)}  # noqa: E731
    return keep(summary), [keep(h) for h in logger.history]


# --- the batched operations --------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.2, 1.0, 2.0])
def test_beta_draws_have_the_beta_moments_and_repeat_with_the_seed(alpha: float) -> None:
    draw = lambda: sample_beta(alpha, 20_000, torch.Generator().manual_seed(5), torch.device("cpu"))  # noqa: E731
    lam = draw()
    assert lam.shape == (20_000,) and torch.isfinite(lam).all() and ((lam >= 0) & (lam <= 1)).all()
    assert lam.mean().item() == pytest.approx(0.5, abs=0.01)
    assert lam.var().item() == pytest.approx(1 / (4 * (2 * alpha + 1)), rel=0.05)  # Beta(a, a): 1 / (4(2a + 1))
    assert torch.equal(lam, draw())


def test_box_masks_clip_at_the_border() -> None:
    mask = box_mask(torch.tensor([0, -3, 30]), torch.tensor([0, -3, 30]), torch.tensor([4, 8, 8]))
    assert mask.shape == (3, 1, 32, 32)
    assert mask.sum((1, 2, 3)).tolist() == [16, 25, 4]
    assert mask[0, 0, :4, :4].all() and mask[2, 0, 30:, 30:].all()


def test_cutout_zeroes_one_square_per_image() -> None:
    x = torch.ones(64, 3, 32, 32)
    out = cutout(x, 8, torch.Generator().manual_seed(0))
    zeroed = (out == 0).all(1).sum((1, 2))  # pixels zeroed in all three channels
    assert out.shape == x.shape and ((zeroed > 0) & (zeroed <= 64)).all()
    assert (zeroed == 64).any() and (zeroed < 64).any()  # whole boxes inside, clipped ones at the border
    assert ((out == 0) | (out == 1)).all() and torch.equal(x, torch.ones_like(x))  # the input is not changed


@pytest.mark.parametrize("mixup,cutmix", [(0.4, 0.0), (0.0, 1.0), (0.4, 1.0)])
def test_mixed_images_are_the_weighted_pair(mixup: float, cutmix: float) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    y = torch.arange(32) % 10
    mixed, other, lam = mix_batch(x, y, mixup, cutmix, gen)
    assert mixed.shape == x.shape and other.shape == y.shape and lam.shape == (32,)
    assert ((lam >= 0) & (lam <= 1)).all() and sorted(other.tolist()) == sorted(y.tolist())
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(1))  # the first draw: the partners
    assert torch.equal(other, y[perm])
    pixels = (mixed == x) | (mixed == x[perm])  # cutmix: every pixel is the image's own or its partner's
    cut = pixels.all((1, 2, 3))
    weighted = lam.view(-1, 1, 1, 1) * x + (1 - lam.view(-1, 1, 1, 1)) * x[perm]
    blend = ((mixed - weighted).abs() < 1e-5).all((1, 2, 3))  # mixup: lam * own + (1 - lam) * partner
    if cutmix == 0:
        assert blend.all()
    if mixup == 0:  # lam = the share of the image's own pixels
        own = (mixed == x).all(1) & (x != x[perm]).all(1)
        assert cut.all() and torch.allclose(own.float().mean((1, 2)), lam, atol=1e-6)
    if mixup > 0 and cutmix > 0:
        assert (blend | cut).all() and (~blend).any() and (~cut).any()


def test_tta_views_average_to_one_weight() -> None:
    x = torch.randn(2, 3, 32, 32)
    for mode, count in (("none", 1), ("flip", 2), ("flip_crop", 6)):
        views = tta_views(x, mode)
        assert len(views) == count and math.isclose(sum(w for w, _ in views), 1.0)
        assert all(v.shape == x.shape for _, v in views)


def test_tta_shifts_are_padded_as_the_training_crop() -> None:
    x = torch.randn(2, 3, 32, 32)
    mirrored, filled = tta_views(x, "flip_crop")[2][1], tta_views(x, "flip_crop", "mean")[2][1]  # shifted 1 px
    for view in (mirrored, filled):
        assert torch.equal(view[:, :, 1:, 1:], x[:, :, :31, :31])
    assert torch.equal(mirrored[:, :, 0, 1:], x[:, :, 1, :31])  # reflect: the row below the edge
    assert not filled[:, :, 0].any() and not filled[:, :, :, 0].any()  # mean: 0, the mean colour after normalising


# --- TTA and EMA change evaluation only, as documented ------------------------------------------------------


def test_tta_flip_is_the_mean_of_the_image_and_its_mirror() -> None:
    torch.manual_seed(0)
    model = build_model(RunConfig()).eval()
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(predict(model, x, None), model(x))
        assert torch.equal(predict(model, x, None, "flip"), (model(x) + model(x.flip(3))) / 2)
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        pair = lambda v: (model(v) + model(v.flip(3))) / 2  # noqa: E731
        by_hand = 0.5 * pair(x) + 0.25 * pair(padded[:, :, :32, :32]) + 0.25 * pair(padded[:, :, 2:, 2:])
        assert torch.allclose(predict(model, x, None, "flip_crop"), by_hand, atol=1e-5)


def test_tta_leaves_training_alone_and_evaluates_val_and_test(batches_dir: Path, tmp_path: Path) -> None:
    plain, plain_log = run(batches_dir, epochs=2)
    flipped, flip_log = run(batches_dir, tmp_path, epochs=2, tta="flip")
    for a, b in zip(plain_log.history, flip_log.history):
        assert (a["train/loss"], a["train/acc"]) == (b["train/loss"], b["train/acc"])  # the same training
    assert [h["val/loss"] for h in plain_log.history] != [h["val/loss"] for h in flip_log.history]
    assert plain["test/loss"] != flipped["test/loss"]
    result = evaluate_checkpoint(tmp_path / "best.pt", {"device": "cpu"})  # the checkpoint's config has tta=flip
    assert result["test/acc"] == flipped["test/acc"] and result["test/loss"] == pytest.approx(flipped["test/loss"])


def test_a_checkpoint_evaluates_with_its_own_tta_padding(batches_dir: Path, tmp_path: Path) -> None:
    summary, _ = run(batches_dir, tmp_path, epochs=1, tta="flip_crop", pad="mean")
    result = evaluate_checkpoint(tmp_path / "best.pt", {"device": "cpu"})  # shifted views padded with the mean
    assert result["test/acc"] == summary["test/acc"] and result["test/loss"] == pytest.approx(summary["test/loss"])
    mirrored = evaluate_checkpoint(tmp_path / "best.pt", {"device": "cpu", "pad": "reflect"})
    assert mirrored["test/loss"] != pytest.approx(summary["test/loss"], rel=1e-9)


def test_weight_ema_averages_parameters_and_batch_norm_statistics() -> None:
    torch.manual_seed(0)
    model = build_model(RunConfig())
    ema = WeightEma(model, 0.99)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for t in model.state_dict().values():
            t.add_(1) if t.is_floating_point() else t.add_(3)
    ema.update()  # the first update's decay is min(0.99, 1/10) = 0.1 (the warm-up)
    for key, value in ema.model.state_dict().items():
        if value.is_floating_point():
            assert torch.allclose(value, before[key] + 0.9), key  # running means and variances included
        else:
            assert torch.equal(value, before[key] + 3), key  # batches seen: copied
    ema.update()  # the second: min(0.99, 2/11), towards the same weights
    weight = ema.model.state_dict()["0.weight"]
    assert torch.allclose(weight, before["0.weight"] + 0.9 + 0.1 * (9 / 11))
    assert not any(p.requires_grad for p in ema.model.parameters())


def test_ema_leaves_training_alone_and_checkpoints_the_average(batches_dir: Path, tmp_path: Path) -> None:
    plain, plain_log = run(batches_dir, epochs=2)
    averaged, ema_log = run(batches_dir, tmp_path, epochs=2, ema=0.9)
    for a, b in zip(plain_log.history, ema_log.history):
        assert (a["train/loss"], a["train/acc"]) == (b["train/loss"], b["train/acc"])
    assert plain["test/loss"] != averaged["test/loss"]
    last = load_checkpoint(tmp_path / "last.pt")
    assert set(last["model"]) == set(last["resume"]["train_model"])
    assert not torch.equal(last["model"]["0.weight"], last["resume"]["train_model"]["0.weight"])
    for name in ("best.pt", "last.pt"):  # both hold the average; each evaluates to the numbers it was logged with
        payload = load_checkpoint(tmp_path / name)
        result = evaluate_checkpoint(tmp_path / name, {"device": "cpu"})
        epoch = next(h for h in ema_log.history if h["epoch"] == payload["epoch"])
        if name == "best.pt":
            assert result["test/acc"] == averaged["test/acc"]
            assert result["test/loss"] == pytest.approx(averaged["test/loss"])
        config = RunConfig.from_dict(payload["config"])
        model = build_model(config)
        model.load_state_dict(payload["model"])
        _, val_b, _ = prepare(config, load_dataset(config), torch.device("cpu"))
        assert evaluate(model, val_b, None) == (pytest.approx(epoch["val/loss"]), epoch["val/acc"])
    printed = lenet("test", tmp_path / "best.pt", "--device", "cpu")
    assert printed.exit_code == 0 and f"test accuracy {averaged['test/acc']:.2f}%" in printed.output


def test_ema_with_a_vanishing_decay_is_the_plain_run(batches_dir: Path) -> None:
    # The average moves all the way to the weights at every step (lerp weight 1 - 1e-9 is 1.0 in fp32).
    assert numbers(*run(batches_dir, epochs=2)) == numbers(*run(batches_dir, epochs=2, ema=1e-9))


def test_resume_of_an_ema_run_is_exact(batches_dir: Path, tmp_path: Path) -> None:
    values = {"epochs": 3, "ema": 0.9, "mixup": 0.4, "cutout": 8}
    straight, full = run(batches_dir, tmp_path / "a", **values)
    config = config_for(batches_dir, **values)
    first = MemoryLogger()
    train(config, first, checkpoint_dir=tmp_path / "b", should_stop=lambda: len(first.history) == 1)
    second = MemoryLogger()
    resumed = train(config, second, checkpoint_dir=tmp_path / "b", resume=True)
    assert [h["epoch"] for h in second.history] == [2, 3]
    both = MemoryLogger()
    both.history = first.history + second.history
    assert numbers(resumed, both) == numbers(straight, full)


# --- determinism, and each setting does what it says --------------------------------------------------------


@pytest.mark.parametrize("values", list(SETTINGS.values()), ids=list(SETTINGS))
def test_each_setting_trains_and_repeats_bit_for_bit(batches_dir: Path, values: dict) -> None:
    summary, logger = run(batches_dir, **values)
    assert summary["state"] == "finished" and 0 <= summary["test/acc"] <= 100
    assert math.isfinite(logger.history[0]["train/loss"]) and 0 <= logger.history[0]["train/clean_acc"] <= 100
    assert numbers(summary, logger) == numbers(*run(batches_dir, **values))


def test_augmentations_change_the_training_batches(batches_dir: Path) -> None:
    plain = run(batches_dir)[1].history[0]["train/loss"]
    for values in ({"cutout": 8}, {"mixup": 0.4}, {"cutmix": 1.0}):
        assert run(batches_dir, **values)[1].history[0]["train/loss"] != plain, values


def test_mixed_loss_with_the_own_label_weighted_one_is_plain_cross_entropy(batches_dir: Path) -> None:
    config = config_for(batches_dir, label_smoothing=0.1)
    train_b, _, _ = prepare(config, load_dataset(config), torch.device("cpu"))
    trainer = Trainer(config, build_model(config), train_b, None, MemoryLogger())
    out, y = torch.randn(8, 10), torch.arange(8)
    plain = trainer.hard_loss(out, y, None, None)
    assert torch.allclose(trainer.hard_loss(out, y, y.roll(1), torch.ones(8)), plain)
    assert torch.allclose(trainer.hard_loss(out, y.roll(1), y, torch.zeros(8)), plain)


def test_clean_accuracy_is_measured_on_a_fixed_unaugmented_train_subset(batches_dir: Path, tmp_path: Path) -> None:
    assert torch.equal(fixed_subset(140, CLEAN_SUBSET, 0), torch.arange(140))  # capped at the split's size
    subset = fixed_subset(50_000, CLEAN_SUBSET, 0)
    assert len(subset.unique()) == CLEAN_SUBSET and torch.equal(subset, fixed_subset(50_000, CLEAN_SUBSET, 0))
    assert not torch.equal(subset, fixed_subset(50_000, CLEAN_SUBSET, 1))
    summary, logger = run(batches_dir, tmp_path, epochs=2)
    assert summary["best/train_clean_acc"] == logger.history[summary["best_epoch"] - 1]["train/clean_acc"]
    assert summary["gap/clean_train_val_acc"] == summary["best/train_clean_acc"] - summary["best/val_acc"]
    payload = load_checkpoint(tmp_path / "best.pt")
    config = RunConfig.from_dict(payload["config"])
    model = build_model(config)
    model.load_state_dict(payload["model"])
    train_x, train_y, _, _ = split_train_val(load_dataset(config), config.val_size, config.split_seed)
    whole_split = Batches(train_x, train_y, payload["mean"], payload["std"], 1024)
    assert evaluate(model, whole_split, None)[1] == summary["best/train_clean_acc"]  # eval mode, no augmentation


# --- distillation and the teacher network -----------------------------------------------------------------


def test_resnet_teachers_have_their_published_size() -> None:
    for arch, params in (("resnet8", 78_042), ("resnet20", 272_474)):  # ResNet-20: 0.27M (He et al. 2016)
        model = build_model(RunConfig(arch=arch))
        assert count_parameters(model) == params and model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_a_resnet_trains_by_the_same_pipeline_and_its_checkpoint_evaluates(batches_dir: Path, tmp_path: Path) -> None:
    summary, _ = run(batches_dir, tmp_path, arch="resnet8")  # `lenet train arch=resnet8`: a teacher
    assert load_checkpoint(tmp_path / "best.pt")["config"]["arch"] == "resnet8" and summary["params"] == 78_042
    result = evaluate_checkpoint(tmp_path / "best.pt", {"device": "cpu"})
    assert result["test/acc"] == summary["test/acc"]  # the checkpoint builds its own architecture
    printed = lenet("test", tmp_path / "best.pt", "--device", "cpu")
    assert printed.exit_code == 0 and f"test accuracy {summary['test/acc']:.2f}%" in printed.output


@pytest.fixture
def teacher(batches_dir: Path, tmp_path: Path) -> Path:
    """A teacher trained on the students' split (a LeNet-5 without batch norm: cheap, and with other layers; any
    architecture serves)."""
    run(batches_dir, tmp_path / "teacher", epochs=2, norm="none", activation="tanh")
    return tmp_path / "teacher" / "best.pt"


def test_distill_weight_zero_is_no_distillation(batches_dir: Path, teacher: Path) -> None:
    plain = numbers(*run(batches_dir, epochs=2))
    assert numbers(*run(batches_dir, epochs=2, teacher=str(teacher), distill_weight=0.0)) == plain
    distilled = numbers(*run(batches_dir, epochs=2, teacher=str(teacher), distill_weight=0.5))
    assert distilled != plain
    assert distilled == numbers(*run(batches_dir, epochs=2, teacher=str(teacher), distill_weight=0.5))


def test_a_distilled_run_records_its_teachers_cost_and_accuracy(batches_dir: Path, tmp_path: Path) -> None:
    taught, _ = run(batches_dir, tmp_path / "teacher", epochs=2, norm="none")
    best = tmp_path / "teacher" / "best.pt"
    student = config_for(batches_dir, epochs=1, teacher=str(best))
    summary = train(student, MemoryLogger())
    assert summary["teacher/arch"] == "lenet5" and summary["teacher/epochs"] == 2
    assert summary["teacher/params"] == taught["params"] and summary["teacher/val_acc"] == taught["best/val_acc"]
    assert summary["teacher/test_acc"] == taught["test/acc"] and summary["teacher/train_s"] == taught["time/total_s"]
    table = teacher_table(pd.DataFrame([{**student.to_dict(), **summary}, {**config_for(batches_dir).to_dict()}]))
    (row,) = table.to_dict("records")  # the run without a teacher adds no row
    assert row["teacher"] == "lenet5 (run teacher)" and row["students"] == 1
    assert row["test acc %"] == f"{taught['test/acc']:.2f}" and row["epochs"] == 2
    assert row["view table (min)"] == "–"  # online teacher logits: no table was computed
    (tmp_path / "teacher" / "last.pt").unlink()  # the teacher's finished run left no last.pt: unknown, not invented
    bare = train(student, MemoryLogger())
    assert math.isnan(bare["teacher/test_acc"]) and bare["teacher/val_acc"] == taught["best/val_acc"]
    assert teacher_table(pd.DataFrame([{**student.to_dict(), **bare}]))["test acc %"].tolist() == ["–"]
    stored = {**student.to_dict(), **bare, "teacher/test_acc": None, "teacher/train_s": None}  # a bundle's nulls
    assert teacher_table(pd.DataFrame([stored]))[["test acc %", "training time (min)"]].values.tolist() == [["–", "–"]]


class StageLogger(MemoryLogger):
    """A MemoryLogger that also keeps every progress call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, int, str]] = []

    def progress(self, done: int, total: int, stage: str = "") -> None:
        self.calls.append((done, total, stage))


def test_computing_the_view_table_reports_its_progress_before_the_first_epoch(batches_dir: Path, teacher: Path) -> None:
    config = config_for(batches_dir, epochs=1, teacher=str(teacher), teacher_logits="precomputed")
    first = StageLogger()
    train(config, first)
    staged = [(done, total) for done, total, stage in first.calls if stage == TABLE_STAGE]
    views = len(reachable_views(config.augment))
    assert staged == [(i, views) for i in range(1, views + 1)]  # one step per view, ending at the total
    assert first.calls[: len(staged)] == [(d, t, TABLE_STAGE) for d, t in staged]  # all before the first batch
    assert {stage for _, _, stage in first.calls[len(staged) :]} == {""}  # then the epoch's batches
    again = StageLogger()
    train(config, again)
    assert all(stage == "" for _, _, stage in again.calls)  # the table is read from its file: nothing to report


def test_distillation_loss_is_the_scaled_kl_on_the_students_batch(batches_dir: Path, teacher: Path) -> None:
    config = config_for(batches_dir, teacher=str(teacher), distill_temperature=3.0)
    dataset = load_dataset(config)
    train_b, _, _ = prepare(config, dataset, torch.device("cpu"))
    loaded = load_teacher(config, dataset, train_b, torch.device("cpu"))
    assert loaded is not None and not loaded.model.training and loaded.scale is None  # same split, same stats
    trainer = Trainer(config, build_model(config), train_b, None, MemoryLogger(), teacher=loaded)
    x, _ = next(iter(train_b))
    student = torch.randn(len(x), 10)
    with torch.no_grad():
        p = F.softmax(loaded.model(x) / 3.0, 1)
    by_hand = 9.0 * (p * (p.log() - F.log_softmax(student / 3.0, 1))).sum(1).mean()
    assert torch.allclose(trainer.distill_loss(x, student), by_hand, atol=1e-5)


@pytest.mark.parametrize("pad", ["reflect", "mean"])
def test_teacher_logits_are_looked_up_for_the_exact_augmented_views(batches_dir: Path, teacher: Path, pad: str) -> None:
    config = config_for(batches_dir, teacher=str(teacher), pad=pad)
    dataset = load_dataset(config)
    train_b, _, _ = prepare(config, dataset, torch.device("cpu"))
    loaded = load_teacher(config, dataset, train_b, torch.device("cpu"))
    assert loaded is not None
    cached_view_table(config, dataset, loaded, train_b)
    assert loaded.table is not None and loaded.table.shape == (len(train_b.labels), VIEWS, 10)
    (cache,) = teacher.parent.glob("best.pt.views-*.pt")  # shared by the runs of a sweep
    written = cache.stat().st_mtime_ns
    for x, _, idx, view in train_b.views():  # augmented batches: every view is one of the table's
        assert torch.allclose(loaded.lookup(idx, view), loaded.logits(x), atol=1e-4)
    again = load_teacher(config, dataset, train_b, torch.device("cpu"))
    assert again is not None
    cached_view_table(config, dataset, again, train_b)
    assert torch.equal(again.table, loaded.table) and cache.stat().st_mtime_ns == written  # read, not recomputed
    assert again.facts["teacher/table_s"] == loaded.facts["teacher/table_s"] > 0  # its cost travels with the file
    values = {"epochs": 2, "teacher": str(teacher), "teacher_logits": "precomputed", "pad": pad}
    tabled = numbers(*run(batches_dir, **values))
    assert tabled == numbers(*run(batches_dir, **values))
    online = numbers(*run(batches_dir, **{**values, "teacher_logits": "online"}))
    assert [h["train/loss"] for h in tabled[1]] == pytest.approx([h["train/loss"] for h in online[1]], rel=1e-4)


def test_teacher_precision_sets_the_teachers_arithmetic_only(batches_dir: Path, teacher: Path) -> None:
    config = config_for(batches_dir, teacher=str(teacher))
    dataset = load_dataset(config)
    train_b, _, _ = prepare(config, dataset, torch.device("cpu"))
    x = train_b.normalise(train_b.images[:64].float())
    teachers = {}
    for precision in ("auto", "fp32", "bf16"):
        loaded = load_teacher(replace(config, teacher_precision=precision), dataset, train_b, torch.device("cpu"))
        assert loaded is not None
        teachers[precision] = loaded
    assert teachers["auto"].dtype is None and teachers["bf16"].dtype == torch.bfloat16  # auto: the run's fp32
    exact, rounded = teachers["fp32"].logits(x), teachers["bf16"].logits(x)
    assert rounded.dtype == torch.float32 and not torch.equal(exact, rounded)
    assert torch.allclose(exact, rounded, atol=0.1)  # bf16 keeps 8 bits of mantissa
    for precision in ("fp32", "bf16"):  # each precision has its own table file next to the teacher
        cached_view_table(replace(config, teacher_precision=precision), dataset, teachers[precision], train_b)
    assert len(list(teacher.parent.glob("best.pt.views-*.pt"))) == 2
    assert not torch.equal(teachers["fp32"].table, teachers["bf16"].table)


def test_a_stop_while_the_teacher_table_is_computed_ends_the_run_as_stopped(batches_dir: Path, teacher: Path) -> None:
    config = config_for(batches_dir, teacher=str(teacher), teacher_logits="precomputed")
    summary = train(config, MemoryLogger(), stop_now=lambda: True)
    assert summary["state"] == "stopped" and summary["epochs_run"] == 0
    assert not list(teacher.parent.glob("best.pt.views-*.pt"))  # no partial table is left


def test_a_teacher_trained_on_another_split_is_refused(batches_dir: Path, teacher: Path) -> None:
    with pytest.raises(CheckpointError, match="could be in the teacher's training set"):
        run(batches_dir, teacher=str(teacher), val_size=30)
    with pytest.raises(CheckpointError, match="does not exist"):
        run(batches_dir, teacher=str(teacher.parent / "nope.pt"))


def test_second_round_lists_what_a_config_turns_on() -> None:
    assert RunConfig().second_round() == [] and RunConfig(teacher="t.pt", distill_weight=0).second_round() == []
    assert RunConfig(ema=0.9, tta="flip", teacher="t.pt").second_round() == ["tta", "ema", "teacher"]


@pytest.mark.parametrize(
    "values,fragment",
    [
        ({"tta": "mirror"}, "tta='mirror' is not valid; choose one of: none, flip, flip_crop"),
        ({"ema": 1.0}, "ema=1.0 is out of range; it must be >= 0.0 and < 1.0"),
        ({"cutout": 33}, "cutout=33 is out of range"),
        ({"mixup": -0.1}, "mixup=-0.1 is out of range"),
        ({"distill_weight": 1.5}, "distill_weight=1.5 is out of range"),
        ({"distill_temperature": 0}, "distill_temperature=0.0 is out of range"),
        ({"arch": "vgg"}, "arch='vgg' is not valid"),
        ({"arch": "resnet8", "dropout": 0.2}, "arch=resnet8 has none, set dropout=0"),
        ({"teacher_logits": "precomputed", "mixup": 0.2}, "with cutout, mixup or cutmix use teacher_logits=online"),
    ],
)
def test_bad_values_are_one_line_config_errors(values: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        RunConfig.from_dict(values)
    assert fragment in str(info.value) and "\n" not in str(info.value)
