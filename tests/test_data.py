"""The real loaders on tiny datasets in the official formats; augmentation; split; safety."""

import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TEST_PER_CLASS, TRAIN_PER_CLASS, make_images

from ablation.config import RunConfig
from ablation.data import (
    Batches,
    check_split,
    gather_batch,
    load_dataset,
    read_batches,
    remove_empty_folders,
    split_train_val,
    synthetic_dataset,
)
from ablation.errors import ConfigError, DataError


def config(**values) -> RunConfig:
    return RunConfig.from_dict({k: str(v) for k, v in values.items()})


def test_python_batches(batches_dir: Path) -> None:
    ds = load_dataset(config(data="cifar10", data_dir=batches_dir))
    assert ds.name == "cifar10" and ds.train_x.dtype == torch.uint8
    assert ds.train_x.shape == (10 * TRAIN_PER_CLASS, 3, 32, 32) and ds.test_x.shape == (10 * TEST_PER_CLASS, 3, 32, 32)
    test_x, test_y = make_images(TEST_PER_CLASS, 1)  # test_batch is written unshuffled
    assert torch.equal(ds.test_x, torch.from_numpy(test_x)) and ds.test_y.tolist() == test_y.tolist()


def test_auto_finds_batches_and_folder(batches_dir: Path, folder_dir: Path) -> None:
    assert load_dataset(config(data_dir=batches_dir)).name == "cifar10"
    assert load_dataset(config(data_dir=folder_dir)).name == "tiny-png"
    assert load_dataset(config(data_dir=folder_dir.parent, data="folder")).name == "tiny-png"  # one level down


def test_image_folder_is_lossless_for_png(folder_dir: Path) -> None:
    ds = load_dataset(config(data="folder", data_dir=folder_dir))
    x, y = make_images(TRAIN_PER_CLASS, 0)
    assert torch.equal(ds.train_x, torch.from_numpy(x)) and ds.train_y.tolist() == y.tolist()
    assert ds.classes[0] == "airplane" and ds.classes[-1] == "truck"


def test_cache_is_used_then_invalidated(folder_dir: Path, tmp_path: Path) -> None:
    cfg = config(data="folder", data_dir=folder_dir)
    first = load_dataset(cfg)
    cached = list((tmp_path / "cache").glob("tiny-png-*.pt"))
    assert len(cached) == 1
    os.utime(cached[0], (0, 0))
    assert torch.equal(load_dataset(cfg).train_x, first.train_x)
    next((folder_dir / "train" / "cat").iterdir()).unlink()  # the dataset changed: decode again
    assert len(load_dataset(cfg).train_y) == len(first.train_y) - 1
    assert len(list((tmp_path / "cache").glob("tiny-png-*.pt"))) == 2


def test_missing_data_dir_says_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no image folder .* found in .*nowhere.*data_dir="):
        load_dataset(config(data="folder", data_dir=tmp_path / "nowhere"))


def test_truncated_batch(batches_dir: Path) -> None:
    path = batches_dir / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(DataError, match="corrupt CIFAR-10 batch .*data_batch_3.*download it again"):
        load_dataset(config(data="cifar10", data_dir=batches_dir))


def test_missing_batch(batches_dir: Path) -> None:
    (batches_dir / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(DataError, match="missing CIFAR-10 batch .*test_batch"):
        load_dataset(config(data="cifar10", data_dir=batches_dir))


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_pickle_cannot_run_code(batches_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with open(batches_dir / "cifar-10-batches-py" / "data_batch_1", "wb") as fh:
        pickle.dump({b"data": _Exploit(), b"labels": []}, fh)
    with pytest.raises(DataError, match="forbidden global"):
        read_batches(batches_dir / "cifar-10-batches-py")
    assert not (tmp_path / "pwned").exists()


def test_corrupt_and_wrong_size_images(folder_dir: Path) -> None:
    bad = sorted((folder_dir / "test" / "dog").iterdir())[1]
    bad.write_bytes(b"not a png")
    with pytest.raises(DataError, match=f"cannot decode image .*{bad.name}"):
        load_dataset(config(data="folder", data_dir=folder_dir))


def test_class_folders_must_match(folder_dir: Path) -> None:
    (folder_dir / "test" / "cat").rename(folder_dir / "test" / "kitten")
    with pytest.raises(DataError, match="one folder per class"):
        load_dataset(config(data="folder", data_dir=folder_dir))


def test_split_is_fixed_and_disjoint() -> None:
    ds = synthetic_dataset(200, 10)
    a = split_train_val(ds, 50, split_seed=0)
    b = split_train_val(ds, 50, split_seed=0)
    c = split_train_val(ds, 50, split_seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[2], c[2])
    assert len(a[0]) == 150 and len(a[2]) == 50
    with pytest.raises(DataError, match="lower val_size"):
        split_train_val(ds, 200, 0)


def test_split_leaves_a_batch_norm_batch_to_train_on() -> None:
    ds = synthetic_dataset(10, 2)
    check_split(config(val_size=9, norm="none"), ds)  # one image trains without batch norm
    check_split(config(val_size=8), ds)  # the two left form one batch of 2 (batch_size > 2 takes all of them)
    with pytest.raises(ConfigError, match="val_size=9 leaves 1 of the 10 training images .*batch norm.* val_size <= 8"):
        check_split(config(val_size=9), ds)
    with pytest.raises(ConfigError, match="val_size=10 leaves 0 of the 10 training images of synthetic for training;"):
        check_split(config(val_size=10, norm="none"), ds)
    with pytest.raises(ConfigError, match="only 2 images; a run needs 3"):
        check_split(config(val_size=1), synthetic_dataset(2, 2))


def reference_crop_flip(image: torch.Tensor) -> list[torch.Tensor]:
    """Every crop (reflect pad 4) and flip of one image, the slow obvious way."""
    padded = F.pad(image[None].float(), (4, 4, 4, 4), mode="reflect")[0].to(torch.uint8)
    crops = [padded[:, dy : dy + 32, dx : dx + 32] for dy in range(9) for dx in range(9)]
    return crops + [c.flip(2) for c in crops]


def test_crop_flip_matches_reference() -> None:
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    gen = torch.Generator().manual_seed(0)
    idx = torch.tensor([3, 1, 7, 7, 0])
    out = gather_batch(images, idx, "crop_flip", gen)
    assert out.shape == (5, 3, 32, 32) and out.dtype == torch.uint8
    for source, augmented in zip(idx, out):
        assert any(torch.equal(augmented, ref) for ref in reference_crop_flip(images[source]))


def test_crops_padded_with_a_colour_match_reference() -> None:
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    fill = torch.tensor([125, 123, 114], dtype=torch.uint8).view(1, 3, 1, 1)  # a mean colour
    idx = torch.tensor([3, 1, 7, 7, 0, 2, 2, 5])
    out = gather_batch(images, idx, "crop_flip", torch.Generator().manual_seed(0), fill)
    for source, augmented in zip(idx, out):
        padded = fill[0].expand(3, 40, 40).clone()
        padded[:, 4:36, 4:36] = images[source]
        crops = [padded[:, dy : dy + 32, dx : dx + 32] for dy in range(9) for dx in range(9)]
        assert any(torch.equal(augmented, ref) for ref in crops + [c.flip(2) for c in crops])
    # the same draws without a fill mirror the image instead; only the padding differs
    mirrored = gather_batch(images, idx, "crop_flip", torch.Generator().manual_seed(0))
    differs = (mirrored != out).any(1)
    assert differs.any() and torch.equal(out.permute(0, 2, 3, 1)[differs], fill.view(3).expand(int(differs.sum()), 3))


def test_flip_only_and_none() -> None:
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    idx = torch.arange(64)
    gen = torch.Generator().manual_seed(0)
    flipped = gather_batch(images, idx, "flip", gen)
    same = [torch.equal(a, b) for a, b in zip(flipped, images)]
    mirrored = [torch.equal(a, b.flip(2)) for a, b in zip(flipped, images)]
    assert all(s or m for s, m in zip(same, mirrored)) and 10 < sum(mirrored) < 54
    assert torch.equal(gather_batch(images, idx, "none", gen), images)


def test_batches_normalise_and_drop_last() -> None:
    images = torch.randint(0, 256, (70, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(70)
    mean, std = torch.full((1, 3, 1, 1), 127.5), torch.full((1, 3, 1, 1), 64.0)
    train = Batches(
        images, labels, mean, std, 32, "crop_flip", shuffle=True, drop_last=True, gen=torch.Generator().manual_seed(0)
    )
    seen = torch.cat([y for _, y in train])
    assert len(train) == 2 and len(seen) == 64 and len(set(seen.tolist())) == 64
    ragged = Batches(images[:65], labels[:65], mean, std, 32, drop_last=True)  # 65 = 2 x 32 + 1
    assert [len(y) for _, y in ragged] == [32, 32], "no training batch of 1 (batch norm cannot use it)"
    small = Batches(images[:5], labels[:5], mean, std, 32, drop_last=True)
    assert [len(y) for _, y in small] == [5], "fewer images than batch_size: one batch of all of them"
    evaluation = Batches(images, labels, mean, std, 32)
    x, y = next(iter(evaluation))
    assert torch.allclose(x, (images[:32].float() - 127.5) / 64) and len(evaluation) == 3


def test_image_folder_archive_reads_without_extracting(folder_dir: Path, tmp_path: Path) -> None:
    import tarfile

    archive = tmp_path / "tiny-png.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder_dir, arcname="tiny-png")
    packed = load_dataset(config(data_dir=archive))
    plain = load_dataset(config(data_dir=folder_dir))
    assert packed.name == "tiny-png" and packed.classes == plain.classes
    assert torch.equal(packed.train_x, plain.train_x) and torch.equal(packed.test_y, plain.test_y)
    truncated = tmp_path / "cut.tar.gz"
    truncated.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(DataError, match="truncated or corrupt"):
        load_dataset(config(data_dir=truncated))


def test_wrong_image_size_is_named(folder_dir: Path) -> None:
    from torchvision.io import write_png

    write_png(torch.zeros(3, 28, 28, dtype=torch.uint8), str(folder_dir / "train" / "cat" / "big.png"))
    with pytest.raises(DataError, match="big.png is 28x28, expected 32x32"):
        load_dataset(config(data_dir=folder_dir))


def test_cached_load_of_corrupt_cache(folder_dir: Path, tmp_path: Path) -> None:
    load_dataset(config(data_dir=folder_dir))
    (cached,) = (tmp_path / "cache").glob("*.pt")
    cached.write_bytes(b"junk")
    with pytest.raises(DataError, match="corrupt dataset cache .*delete it"):
        load_dataset(config(data_dir=folder_dir))


def test_failed_download_says_where_to_put_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LENET_CIFAR10_URL", "http://127.0.0.1:9/cifar-10-python.tar.gz")  # discard port: refused
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no CIFAR-10 found in .*empty and the download from .* failed .*data_dir="):
        load_dataset(config(data="cifar10", data_dir=tmp_path / "empty"))
    assert (tmp_path / "empty").is_dir(), "a folder the user made is kept"
    with pytest.raises(DataError, match="missing/cifar \\(the folder does not exist\\) and the download"):
        load_dataset(config(data="cifar10", data_dir=tmp_path / "missing" / "cifar"))
    assert not (tmp_path / "missing").exists(), "a failed download leaves no folder tree behind"


def test_cleanup_after_a_failed_download_keeps_what_another_process_wrote(tmp_path: Path) -> None:
    """Only empty folders go: a concurrent download filling the same tree keeps its files."""
    (tmp_path / "tree" / "a" / "empty").mkdir(parents=True)
    (tmp_path / "tree" / "b").mkdir()
    (tmp_path / "tree" / "b" / "part.tar.gz").write_bytes(b"x")
    remove_empty_folders(tmp_path / "tree")
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["tree", "tree/b", "tree/b/part.tar.gz"]


def test_channel_stats_are_exact() -> None:
    from ablation.data import channel_stats

    x = torch.randint(0, 256, (50, 3, 32, 32), dtype=torch.uint8)
    mean, std = channel_stats(x)
    flat = x.transpose(0, 1).reshape(3, -1).double()
    assert torch.allclose(mean.flatten().double(), flat.mean(1), atol=1e-4)
    assert torch.allclose(std.flatten().double(), flat.std(1), atol=1e-4)
