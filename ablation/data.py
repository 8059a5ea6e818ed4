"""CIFAR-10 as uint8 tensors: sources (official, python batches, image folder, synthetic), cache, split, batches."""

from __future__ import annotations

import contextlib
import hashlib
import math
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
GAMMA_TRIES = 8  # Marsaglia-Tsang candidates per draw: each is accepted with p >= 0.95, all 8 fail with p < 4e-11


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


# The distinct training views of an image: 9 x 9 crop offsets (-4..4 px each way) x 2 mirror states.
VIEWS = 162
IDENTITY_VIEW = (4 * 9 + 4) * 2  # no offset, no mirror


def augment_draws(
    batch: int, mode: str, gen: torch.Generator, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample crop offsets (2 x B x 1, -4..4 px; 0 without crop) and mirror flags (B x 1; False without flip)."""
    shift = (
        torch.randint(-4, 5, (2, batch, 1), generator=gen, device=device)
        if "crop" in mode
        else torch.zeros(2, batch, 1, dtype=torch.int64, device=device)
    )
    flip = (
        torch.rand(batch, 1, generator=gen, device=device) < 0.5
        if "flip" in mode
        else torch.zeros(batch, 1, dtype=torch.bool, device=device)
    )
    return shift, flip


def view_indices(shift: torch.Tensor, flip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample row and column indices (B x 32 each) that crop (pad 4, reflect) by `shift` and mirror by `flip`."""
    base = torch.arange(32, device=shift.device)
    rows, cols = _reflect(base + shift[0]), _reflect(base + shift[1])
    return rows, torch.where(flip, 31 - cols, cols)


def view_ids(shift: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Each sample's view as one number in 0 .. VIEWS - 1 (its crop offsets and mirror state)."""
    return (((shift[0] + 4) * 9 + shift[1] + 4) * 2 + flip.long()).view(-1)


def view_params(view: int, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The crop offsets and mirror flags (as `augment_draws` returns them) of one view, for `batch` samples."""
    dy, dx, flip = view // 18 - 4, view // 2 % 9 - 4, view % 2
    shift = torch.tensor([dy, dx], device=device).view(2, 1, 1).expand(2, batch, 1)
    return shift, torch.full((batch, 1), bool(flip), device=device)


def reachable_views(mode: str) -> list[int]:
    """The views an `augment` mode can produce."""
    shifts = range(-4, 5) if "crop" in mode else (0,)
    flips = (0, 1) if "flip" in mode else (0,)
    return [((dy + 4) * 9 + dx + 4) * 2 + f for dy in shifts for dx in shifts for f in flips]


def augment_indices(
    batch: int, mode: str, gen: torch.Generator, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample row and column indices (B x 32 each) that crop (pad 4, reflect) and/or flip."""
    return view_indices(*augment_draws(batch, mode, gen, device))


def gather_batch(
    images: torch.Tensor, idx: torch.Tensor, mode: str, gen: torch.Generator, fill: torch.Tensor | None = None
) -> torch.Tensor:
    """The uint8 images at `idx`, each randomly cropped/flipped, in one gather (no per-image Python)."""
    return gather_views(images, idx, mode, gen, fill)[0]


def gather_views(
    images: torch.Tensor,
    idx: torch.Tensor,
    mode: str,
    gen: torch.Generator | None,
    fill: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`gather_batch` that also returns each image's view id (`view_ids`)."""
    if mode == "none":
        return images[idx], torch.full((len(idx),), IDENTITY_VIEW, device=images.device)
    assert gen is not None
    shift, flip = augment_draws(len(idx), mode, gen, images.device)
    return take_views(images, idx, shift, flip, fill), view_ids(shift, flip)


def take_views(
    images: torch.Tensor, idx: torch.Tensor, shift: torch.Tensor, flip: torch.Tensor, fill: torch.Tensor | None
) -> torch.Tensor:
    """The images at `idx` cropped by `shift` and mirrored by `flip`: the padding mirrors the image, or is the
    colour `fill` (uint8, 1 x 3 x 1 x 1) where one is given."""
    x = take_view(images, idx, *view_indices(shift, flip))
    return x if fill is None else torch.where(pad_mask(shift), fill, x)


def pad_mask(shift: torch.Tensor) -> torch.Tensor:
    """B x 1 x 32 x 32: the pixels a crop by `shift` (2 x B x 1) takes from the padding (mirroring moves none)."""
    base = torch.arange(32, device=shift.device)
    outside = ((base + shift) < 0) | ((base + shift) > 31)  # 2 x B x 32: rows, then columns
    return (outside[0][:, :, None] | outside[1][:, None, :])[:, None]


def take_view(images: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """The images at `idx` re-indexed by per-sample `rows` and `cols` (B x 32 each), in one gather."""
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
    fill: torch.Tensor | None = None  # the crop's padding colour (uint8, 1 x 3 x 1 x 1); None = mirror the image

    def _stop(self) -> int:
        n = len(self.labels)
        return n - n % self.batch_size if self.drop_last and n >= self.batch_size else n

    def __len__(self) -> int:
        return -(-self._stop() // self.batch_size)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 -> float, zero mean and unit variance per channel."""
        return ((x.float() - self.mean) / self.std).contiguous(memory_format=self.memory_format)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y, _, _ in self.views():
            yield x, y

    def views(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(images, labels, their indices, their view ids) per batch: the same batches and draws as iterating."""
        n = len(self.labels)
        order = (
            torch.randperm(n, generator=self.gen, device=self.images.device)
            if self.shuffle
            else torch.arange(n, device=self.images.device)
        )
        for start in range(0, self._stop(), self.batch_size):
            idx = order[start : start + self.batch_size]
            x, view = gather_views(self.images, idx, self.augment, self.gen, self.fill)
            yield self.normalise(x), self.labels[idx], idx, view


def sample_gamma_log(shape: float, n: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """log of n Gamma(shape, 1) draws (Marsaglia & Tsang 2000, batched: GAMMA_TRIES candidates each, the first
    accepted is kept); shape < 1 uses Gamma(shape + 1) * U^(1/shape). Logs, so tiny draws never round to 0."""
    boost = shape < 1
    d = (shape + 1 if boost else shape) - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    z = torch.randn(n, GAMMA_TRIES, generator=gen, device=device)
    u = torch.rand(n, GAMMA_TRIES, generator=gen, device=device)
    v = (1 + c * z).clamp_min(1e-12) ** 3
    accepted = (1 + c * z > 0) & (torch.log(u) < 0.5 * z * z + d - d * v + d * torch.log(v))
    first = accepted.to(torch.uint8).argmax(1, keepdim=True)  # argmax returns the first maximum
    log_g = math.log(d) + torch.log(v.gather(1, first).squeeze(1))
    if boost:
        log_g = log_g + torch.log(torch.rand(n, generator=gen, device=device).clamp_min(1e-38)) / shape
    return log_g


def sample_beta(alpha: float, n: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """n draws from Beta(alpha, alpha) as X / (X + Y), X, Y ~ Gamma(alpha), from `gen` (reproducible)."""
    log_g = sample_gamma_log(alpha, 2 * n, gen, device)
    return torch.sigmoid(log_g[:n] - log_g[n:])


def box_mask(top: torch.Tensor, left: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """B x 1 x 32 x 32 bool masks of size x size squares at (top, left) per image, clipped at the border."""
    pixels = torch.arange(32, device=top.device)
    rows = (pixels >= top.view(-1, 1)) & (pixels < (top + size).view(-1, 1))
    cols = (pixels >= left.view(-1, 1)) & (pixels < (left + size).view(-1, 1))
    return (rows[:, :, None] & cols[:, None, :])[:, None]


def random_boxes(size: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Masks of squares of side `size` (per image) centred at a uniformly random pixel (DeVries & Taylor 2017,
    Yun et al. 2019: the centre is anywhere in the image and the box is clipped, so it may be smaller)."""
    centre = torch.randint(0, 32, (2, len(size)), generator=gen, device=size.device)
    return box_mask(centre[0] - size // 2, centre[1] - size // 2, size)


def cutout(x: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """Zero (= the mean colour, after normalisation) one size x size square per image, at a random centre."""
    return x.masked_fill(random_boxes(torch.full((len(x),), size, device=x.device), gen), 0.0)


def mix_batch(
    x: torch.Tensor, y: torch.Tensor, mixup: float, cutmix: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image mixup/cutmix with a partner from one random permutation of the batch: (images, partner labels,
    lambda = the weight of each image's own label). Each image draws its own lambda ~ Beta(alpha, alpha) (timm's
    `elem` mode); cutmix pastes the partner's box of area (1 - lambda) * 32^2 and recomputes lambda from the
    clipped box; with both on, each image takes one of the two with probability 1/2."""
    n = len(y)
    perm = torch.randperm(n, generator=gen, device=x.device)
    other, other_y = x[perm], y[perm]
    mixed, lam = x, torch.ones(n, device=x.device)
    if mixup > 0:
        lam = sample_beta(mixup, n, gen, x.device)
        mixed = torch.lerp(other, x, lam.view(-1, 1, 1, 1).to(x.dtype))
    if cutmix > 0:
        side = (32 * torch.sqrt(1 - sample_beta(cutmix, n, gen, x.device))).long()
        box = random_boxes(side, gen)
        cut, cut_lam = torch.where(box, other, x), 1 - box.sum((1, 2, 3)) / 1024.0
        if mixup > 0:
            use_cut = torch.rand(n, generator=gen, device=x.device) < 0.5
            cut = torch.where(use_cut.view(-1, 1, 1, 1), cut, mixed)
            cut_lam = torch.where(use_cut, cut_lam, lam)
        mixed, lam = cut, cut_lam
    return mixed.contiguous(memory_format=_layout(x)), other_y, lam


def _layout(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format


def tta_views(x: torch.Tensor, mode: str, pad: str = "reflect") -> list[tuple[float, torch.Tensor]]:
    """(weight, view) pairs whose weighted logits `evaluate` sums. flip: the image and its mirror, 1/2 each;
    flip_crop (airbench94's mirror + translate): that pair at 1/2, and the pair shifted by 1 px up-left and
    down-right (padded as the training crop: mirrored, or pad=mean: 0, the exact mean colour of normalised images,
    which training crops round to whole uint8 levels: < 0.01 std apart) at 1/4 each."""
    if mode == "none":
        return [(1.0, x)]
    if mode == "flip":
        return [(0.5, x), (0.5, x.flip(3))]
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect" if pad == "reflect" else "constant")
    shifted = [padded[:, :, :32, :32], padded[:, :, 2:, 2:]]
    return [(0.25, x), (0.25, x.flip(3))] + [(0.125, v) for s in shifted for v in (s, s.flip(3))]


def fixed_subset(n: int, size: int, seed: int) -> torch.Tensor:
    """Sorted indices of min(size, n) of n images, fixed by `seed` (the clean-train-accuracy subset)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size].sort().values
