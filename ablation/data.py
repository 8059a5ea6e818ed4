"""CIFAR-10 as uint8 tensors: sources (official, python batches, image folder, synthetic), cache, split, batches."""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from ablation.config import RunConfig
from ablation.errors import ConfigError, DataError

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
BATCHES_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
CACHE_VERSION = 1  # bump when the cached tensor layout changes


@dataclass(frozen=True)
class Dataset:
    """All images as uint8 N x 3 x 32 x 32 tensors with int64 labels; `name` says where they came from."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: tuple[str, ...]
    name: str  # e.g. cifar10 (official), cifar10-jpg (an image folder's name), synthetic


def data_root(config: RunConfig) -> Path:
    """The data directory: the config's `data_dir`, else $LENET_DATA_DIR, else ~/.cache/lenet."""
    raw = config.data_dir or os.environ.get("LENET_DATA_DIR") or "~/.cache/lenet"
    return Path(raw).expanduser()


def cache_dir() -> Path:
    """Where decoded tensors are cached: $LENET_CACHE_DIR, else ~/.cache/lenet/tensors."""
    return Path(os.environ.get("LENET_CACHE_DIR") or "~/.cache/lenet/tensors").expanduser()


def load_dataset(config: RunConfig) -> Dataset:
    """Load the dataset a config names, decoding it once into a cached tensor file."""
    if config.data == "synthetic":
        return synthetic_dataset()
    root = data_root(config)
    source, where = _locate(config.data, root)
    if source == "download":
        where = download_cifar10(root)
        source = "batches"
    key = _fingerprint(source, where)
    name = {"batches": "cifar10", "archive": _archive_stem(where)}.get(source, where.name)
    cached = cache_dir() / f"{name}-{key}.pt"
    if cached.exists():
        return _read_cache(cached)
    reader = {"batches": read_batches, "archive": read_image_archive}.get(source, read_image_folder)
    dataset = reader(where)
    _write_cache(cached, dataset)
    return dataset


def _locate(kind: str, root: Path) -> tuple[str, Path]:
    """Find the source for `data=kind` under `root`: ('batches'|'folder'|'archive'|'download', path)."""
    if root.is_file() and kind in ("auto", "folder"):
        if not root.name.endswith(ARCHIVE_SUFFIXES):
            raise DataError(
                f"data_dir={root} is a file; give a folder or an image-folder archive ({', '.join(ARCHIVE_SUFFIXES)})"
            )
        return "archive", root
    batches = next((d for d in (root / BATCHES_DIR, root) if (d / "data_batch_1").exists()), None)
    if kind in ("auto", "cifar10") and batches is not None:
        return "batches", batches
    if kind in ("auto", "folder"):
        folder = find_image_folder(root)
        if folder is not None:
            return "folder", folder
    if kind == "folder":
        raise DataError(
            f"no image folder (train/<class>/*, test/<class>/*) found in {root}; extract one there, "
            f"e.g. tar -xzf cifar10-jpg.tar.gz -C {root}, or set data_dir="
        )
    return "download", root


def find_image_folder(root: Path) -> Path | None:
    """`root` itself or its first sub-folder (sorted) that holds both train/ and test/."""
    if not root.is_dir():
        return None
    candidates = [root, *sorted(p for p in root.iterdir() if p.is_dir())]
    return next((p for p in candidates if (p / "train").is_dir() and (p / "test").is_dir()), None)


def download_cifar10(root: Path) -> Path:
    """Fetch the official CIFAR-10 python release into `root` with torchvision (checks its md5)."""
    from torchvision.datasets.utils import download_and_extract_archive

    # A cluster without internet can point LENET_CIFAR10_URL at a mirror of the same file (md5 checked).
    url = os.environ.get("LENET_CIFAR10_URL", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz")
    created = first_missing(root)  # the folder tree this download creates: removed again if it fails
    try:
        root.mkdir(parents=True, exist_ok=True)
        download_and_extract_archive(url, str(root), md5="c58f30108f718f92721af3b95e74349a")
    except Exception as exc:  # urllib, ssl, OSError, RuntimeError(md5): all mean "no usable copy"
        if created is not None:
            remove_empty_folders(created)
        raise DataError(
            f"no CIFAR-10 found in {root}{' (the folder does not exist)' if created else ''} and the download "
            f"from {url} failed ({type(exc).__name__}); put the python batches or an image folder there, "
            f"or set data_dir= / LENET_DATA_DIR"
        ) from None
    return root / BATCHES_DIR


def remove_empty_folders(top: Path) -> None:
    """Remove `top` and the folders under it that are empty, bottom-up: another process may be filling the
    same tree (a concurrent download), and what it wrote must stay."""
    for dirpath, _, _ in os.walk(top, topdown=False):
        with contextlib.suppress(OSError):  # not empty (or gone already): leave it
            os.rmdir(dirpath)


def first_missing(path: Path) -> Path | None:
    """The outermost folder of `path` that does not exist yet (None when `path` exists)."""
    missing = None
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing = folder
    return missing


class _CifarUnpickler(pickle.Unpickler):
    """Admits only what CIFAR python batches contain (numpy arrays), so a pickle cannot run code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"forbidden global {module}.{name}")
        return super().find_class(module, name)


def _read_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """One python batch file -> (uint8 N x 3 x 32 x 32, int64 labels)."""
    import numpy as np

    try:
        with open(path, "rb") as fh:
            entry = _CifarUnpickler(fh, encoding="bytes").load()
        data = np.asarray(entry[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = torch.as_tensor(list(entry.get(b"labels", entry.get(b"fine_labels", []))), dtype=torch.int64)
    except FileNotFoundError:
        raise DataError(
            f"missing CIFAR-10 batch {path}; re-download it (delete {path.parent} and run with data=cifar10)"
        ) from None
    except Exception as exc:
        raise DataError(
            f"corrupt CIFAR-10 batch {path} ({type(exc).__name__}: {exc}); "
            f"delete {path.parent} and download it again with data=cifar10"
        ) from None
    if len(labels) != len(data):
        raise DataError(
            f"corrupt CIFAR-10 batch {path}: {len(data)} images but {len(labels)} labels; download it again"
        )
    return torch.from_numpy(data.copy()), labels


def read_batches(folder: Path) -> Dataset:
    """Read the official python batches (data_batch_1..5, test_batch) from `folder`."""
    train = [_read_batch(folder / name) for name in TRAIN_BATCHES]
    test_x, test_y = _read_batch(folder / "test_batch")
    return Dataset(
        torch.cat([x for x, _ in train]), torch.cat([y for _, y in train]), test_x, test_y, CIFAR10_CLASSES, "cifar10"
    )


def _list_split(split_dir: Path, classes: tuple[str, ...] | None) -> tuple[list[Path], list[int], tuple[str, ...]]:
    """Image paths and labels of one split; class index = position in the sorted class-folder names."""
    found = tuple(sorted(p.name for p in split_dir.iterdir() if p.is_dir()))
    if not found or (classes is not None and found != classes):
        raise DataError(
            f"{split_dir} must hold one folder per class ({', '.join(classes or CIFAR10_CLASSES)}); "
            f"found {', '.join(found) or 'none'}"
        )
    paths, labels = [], []
    for index, cls in enumerate(found):
        files = sorted(p for p in (split_dir / cls).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        paths += files
        labels += [index] * len(files)
    if not paths:
        raise DataError(f"no .png/.jpg images under {split_dir}; check the data directory")
    return paths, labels, found


def _decode(path: Path | str, data: bytes | None = None) -> torch.Tensor:
    """Decode one PNG/JPEG file (or its bytes, read from an archive) into uint8 3 x 32 x 32."""
    from torchvision.io import ImageReadMode, decode_image, read_file

    try:
        raw = read_file(str(path)) if data is None else torch.frombuffer(bytearray(data), dtype=torch.uint8)
        image = decode_image(raw, mode=ImageReadMode.RGB)
    except Exception as exc:
        raise DataError(f"cannot decode image {path} ({type(exc).__name__}); replace or delete the file") from None
    if tuple(image.shape[1:]) != (32, 32):
        raise DataError(f"image {path} is {image.shape[2]}x{image.shape[1]}, expected 32x32 (CIFAR-10)")
    return image


def _archive_stem(path: Path) -> str:
    return next(path.name[: -len(s)] for s in (*ARCHIVE_SUFFIXES, "") if path.name.endswith(s))


def read_image_archive(path: Path) -> Dataset:
    """Decode an image folder packed as a tar archive (…/{train,test}/<class>/*.jpg) without extracting it."""
    import tarfile

    members: dict[str, dict[str, list[tuple[str, bytes]]]] = {"train": {}, "test": {}}
    try:
        with tarfile.open(path) as tar:
            for info in tar:
                parts = info.name.split("/")
                if (
                    info.isfile()
                    and len(parts) >= 3
                    and parts[-3] in members
                    and info.name.lower().endswith(IMAGE_SUFFIXES)
                ):
                    members[parts[-3]].setdefault(parts[-2], []).append((info.name, tar.extractfile(info).read()))
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(
            f"cannot read archive {path} ({type(exc).__name__}: {exc}); it is truncated or corrupt, fetch it again"
        ) from None
    classes = tuple(sorted(members["train"]))
    if not classes or tuple(sorted(members["test"])) != classes:
        raise DataError(f"archive {path} must hold train/<class>/* and test/<class>/* images with the same classes")
    with ThreadPoolExecutor(max_workers=len(os.sched_getaffinity(0))) as pool:
        split = {}
        for name, by_class in members.items():
            files = [(f, i) for i, c in enumerate(classes) for f in sorted(by_class[c])]
            images = list(pool.map(lambda item: _decode(*item[0]), files, chunksize=256))
            split[name] = (torch.stack(images), torch.tensor([i for _, i in files]))
    return Dataset(*split["train"], *split["test"], classes, _archive_stem(path))


def read_image_folder(root: Path) -> Dataset:
    """Decode an image folder `root/{train,test}/<class>/*.{png,jpg}` (decoding once, on all cores)."""
    train_paths, train_labels, classes = _list_split(root / "train", None)
    test_paths, test_labels, _ = _list_split(root / "test", classes)
    with ThreadPoolExecutor(max_workers=len(os.sched_getaffinity(0))) as pool:
        train_x = torch.stack(list(pool.map(_decode, train_paths, chunksize=256)))
        test_x = torch.stack(list(pool.map(_decode, test_paths, chunksize=256)))
    return Dataset(train_x, torch.tensor(train_labels), test_x, torch.tensor(test_labels), classes, root.name)


def synthetic_dataset(n_train: int = 50_000, n_test: int = 10_000, seed: int = 0) -> Dataset:
    """Random images with a learnable class signal (a per-class colour), for smoke runs and benchmarks only."""
    gen = torch.Generator().manual_seed(seed)
    colours = torch.randint(0, 256, (10, 3, 1, 1), generator=gen)

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, 10, (n,), generator=gen)
        noise = torch.randint(-96, 96, (n, 3, 32, 32), generator=gen)
        return (colours[y] + noise).clamp(0, 255).to(torch.uint8), y

    train_x, train_y = make(n_train)
    test_x, test_y = make(n_test)
    return Dataset(train_x, train_y, test_x, test_y, CIFAR10_CLASSES, "synthetic")


def _fingerprint(source: str, where: Path) -> str:
    """A short hash of every file's name, size and mtime, so a changed dataset is decoded again."""
    digest = hashlib.sha1(f"{CACHE_VERSION}|{source}|{where.resolve()}".encode())
    if where.is_file():
        digest.update(f"{where.stat().st_size}|{where.stat().st_mtime_ns}".encode())
    for dirpath, dirnames, filenames in os.walk(where):
        dirnames.sort()
        for name in sorted(filenames):
            stat = os.stat(os.path.join(dirpath, name))
            digest.update(f"{dirpath}/{name}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:12]


def _write_cache(path: Path, dataset: Dataset) -> None:
    """Best effort: a cache that cannot be written (read-only, full disk) only means decoding again next time."""
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({**dataset.__dict__, "classes": list(dataset.classes)}, tmp)
        tmp.replace(path)  # atomic: concurrent workers never read a half-written cache
    except (OSError, RuntimeError):  # torch.save reports a failed write as RuntimeError
        with contextlib.suppress(OSError):  # e.g. NotADirectoryError when the cache dir sits under a file
            tmp.unlink(missing_ok=True)


def _read_cache(path: Path) -> Dataset:
    try:
        raw = torch.load(path, weights_only=True)
        return Dataset(**{**raw, "classes": tuple(raw["classes"])})
    except Exception:
        raise DataError(f"corrupt dataset cache {path}; delete it and run again to rebuild it") from None


def check_split(config: RunConfig, dataset: Dataset) -> None:
    """`val_size` must leave training images (2 with batch norm: it needs 2 images per batch) and the
    validation set non-empty; checked as soon as the data is loaded, before a run starts."""
    n, need = len(dataset.train_y), 2 if config.norm == "batch" else 1
    left = n - config.val_size
    if left >= need:
        return
    why = " (batch norm needs at least 2)" if config.norm == "batch" else ""
    if n - need < 1:
        raise ConfigError(
            f"the training set of {dataset.name} has only {n} images; a run needs {need + 1} "
            f"({need} to train{why}, 1 to validate): use a bigger data set"
        )
    raise ConfigError(
        f"val_size={config.val_size} leaves {max(left, 0)} of the {n} training images of {dataset.name} "
        f"for training{why}; set val_size <= {n - need}"
    )


def split_train_val(dataset: Dataset, val_size: int, split_seed: int) -> tuple[torch.Tensor, ...]:
    """(train_x, train_y, val_x, val_y): `val_size` training images held out by a fixed permutation."""
    n = len(dataset.train_y)
    if val_size >= n:
        raise DataError(f"val_size={val_size} leaves no training images (the training set has {n}); lower val_size")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    val, train = order[:val_size], order[val_size:]
    return dataset.train_x[train], dataset.train_y[train], dataset.train_x[val], dataset.train_y[val]


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std (in 0..255 pixel units) of uint8 images, shaped 1 x 3 x 1 x 1.

    Exact, from a 256-bin histogram per channel: ~7x faster than a float copy of the images."""
    levels = torch.arange(256, dtype=torch.float64, device=x.device)
    stats = []
    for c in range(3):
        counts = torch.bincount(x[:, c].reshape(-1), minlength=256).double()
        n = counts.sum()
        mean = (counts * levels).sum() / n
        stats.append((mean, ((counts * (levels - mean) ** 2).sum() / (n - 1)).sqrt()))
    mean, std = (torch.stack(v).float().view(1, 3, 1, 1) for v in zip(*stats))
    return mean, std


def _reflect(index: torch.Tensor) -> torch.Tensor:
    """Map pixel indices in [-4, 35] back into [0, 31] by mirror reflection (no edge repeat)."""
    return 31 - (31 - index.abs()).abs()


def augment_indices(
    batch: int, mode: str, gen: torch.Generator, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample row and column indices (B x 32 each) that crop (pad 4, reflect) and/or flip."""
    base = torch.arange(32, device=device)
    rows = base.expand(batch, 32)
    cols = base.expand(batch, 32)
    if "crop" in mode:
        shift = torch.randint(-4, 5, (2, batch, 1), generator=gen, device=device)
        rows, cols = _reflect(rows + shift[0]), _reflect(cols + shift[1])
    if "flip" in mode:
        flip = torch.rand(batch, 1, generator=gen, device=device) < 0.5
        cols = torch.where(flip, 31 - cols, cols)
    return rows, cols


def gather_batch(images: torch.Tensor, idx: torch.Tensor, mode: str, gen: torch.Generator) -> torch.Tensor:
    """The uint8 images at `idx`, each randomly cropped/flipped, in one gather (no per-image Python)."""
    if mode == "none":
        return images[idx]
    rows, cols = augment_indices(len(idx), mode, gen, images.device)
    # Flat offsets into the N*3*32*32 tensor: image, channel (1024 px), row (32 px), column.
    channel = torch.arange(3, device=images.device).view(1, 3, 1, 1) * 1024
    offsets = idx.view(-1, 1, 1, 1) * 3072 + channel + rows.view(-1, 1, 32, 1) * 32 + cols.view(-1, 1, 1, 32)
    return images.view(-1).take(offsets)


@dataclass
class Batches:
    """Shuffled, augmented, normalised float batches from uint8 images resident on one device."""

    images: torch.Tensor  # uint8 N x 3 x 32 x 32, contiguous
    labels: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    batch_size: int
    augment: str = "none"
    shuffle: bool = False
    drop_last: bool = False  # training drops a ragged last batch (batch norm needs > 1 image)
    memory_format: torch.memory_format = torch.contiguous_format
    gen: torch.Generator | None = None

    def _stop(self) -> int:
        n = len(self.labels)
        return n - n % self.batch_size if self.drop_last and n >= self.batch_size else n

    def __len__(self) -> int:
        return -(-self._stop() // self.batch_size)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 -> float, zero mean and unit variance per channel."""
        return ((x.float() - self.mean) / self.std).contiguous(memory_format=self.memory_format)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        order = (
            torch.randperm(n, generator=self.gen, device=self.images.device)
            if self.shuffle
            else torch.arange(n, device=self.images.device)
        )
        for start in range(0, self._stop(), self.batch_size):
            idx = order[start : start + self.batch_size]
            yield self.normalise(gather_batch(self.images, idx, self.augment, self.gen)), self.labels[idx]
