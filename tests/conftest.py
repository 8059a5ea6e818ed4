"""Tiny CIFAR-10-shaped datasets generated in the official formats, so tests use the real loaders."""

from __future__ import annotations

import os
import pickle
import pwd
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import Result
from torchvision.io import write_png
from typer.testing import CliRunner

from ablation.data import CIFAR10_CLASSES

TRAIN_PER_CLASS = 16
TEST_PER_CLASS = 4


def make_images(n_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 N x 3 x 32 x 32 images whose class is learnable (a class colour plus noise)."""
    rng = np.random.default_rng(seed)
    colours = np.random.default_rng(123).integers(0, 256, (10, 3, 1, 1))
    labels = np.repeat(np.arange(10), n_per_class)
    noise = rng.integers(-60, 60, (len(labels), 3, 32, 32))
    return np.clip(colours[labels] + noise, 0, 255).astype(np.uint8), labels


def write_batches(root: Path, seed: int = 0) -> Path:
    """The official python-batch layout: cifar-10-batches-py/data_batch_1..5 and test_batch."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_x, train_y = make_images(TRAIN_PER_CLASS, seed)
    parts = np.array_split(np.random.default_rng(seed).permutation(len(train_y)), 5)
    files = {f"data_batch_{i + 1}": idx for i, idx in enumerate(parts)}
    test_x, test_y = make_images(TEST_PER_CLASS, seed + 1)
    for name, (x, y) in {
        **{k: (train_x[v], train_y[v]) for k, v in files.items()},
        "test_batch": (test_x, test_y),
    }.items():
        entry = {
            b"batch_label": name.encode(),
            b"labels": [int(v) for v in y],
            b"data": x.reshape(len(x), -1),
            b"filenames": [f"{i}.png".encode() for i in range(len(y))],
        }
        with open(folder / name, "wb") as fh:
            pickle.dump(entry, fh, protocol=2)
    return folder


def write_folder(root: Path, seed: int = 0) -> Path:
    """The image-folder layout: train/<class>/NNNN.png and test/<class>/NNNN.png."""
    for split, per_class, offset in (("train", TRAIN_PER_CLASS, 0), ("test", TEST_PER_CLASS, 1)):
        x, y = make_images(per_class, seed + offset)
        for i, (image, label) in enumerate(zip(x, y)):
            path = root / split / CIFAR10_CLASSES[label] / f"{i:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_png(torch.from_numpy(image), str(path))
    return root


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test gets its own cache, data dir, run home and W&B directory (W&B's process-wide state reset)."""
    monkeypatch.setenv("LENET_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("LENET_DATA_DIR", str(tmp_path / "no-data-here"))
    monkeypatch.setenv("LENET_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LENET_STORE", raising=False)  # the store is $LENET_HOME/lenet.db (and `--store` sets it)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    yield
    if "wandb" in sys.modules:
        sys.modules["wandb"].teardown()  # W&B caches its settings (e.g. WANDB_DIR) per process


@pytest.fixture
def batches_dir(tmp_path: Path) -> Path:
    """A data dir holding tiny official python batches."""
    write_batches(tmp_path / "batches")
    return tmp_path / "batches"


@pytest.fixture
def folder_dir(tmp_path: Path) -> Path:
    """A data dir holding a tiny image folder named tiny-png."""
    return write_folder(tmp_path / "tiny-png")


# Settings that make a real training run take well under a second on the tiny data.
TINY = {"val_size": 20, "batch_size": 32, "epochs": 1, "device": "cpu"}


def lenet(*args: object, env: dict[str, str] | None = None) -> Result:
    """Run `lenet ARGS` in this process (Typer's CliRunner); `output` holds stdout and stderr together."""
    from cli import app

    return CliRunner().invoke(app, [str(a) for a in args], env=env)


def output_lines(result: Result) -> list[str]:
    """The non-empty lines a command printed (stdout and stderr)."""
    return [line for line in result.output.splitlines() if line.strip()]


@contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    """A real tmpfs mounted at `path` with mount `options` ("ro": read-only; "size=64k": a small disk to fill).
    File permissions cannot fake these (tests run as root, which ignores them); skips the test, with the
    reason, where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    except FileNotFoundError:
        pytest.skip("cannot mount a tmpfs here (no mount command)")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip() or 'mounting needs root'})")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(path)], check=True)  # a connection still open: detach it


# ---- A throw-away PostgreSQL server (the Debian package's binaries), for the PostgreSQL store's tests ----


def postgres_bin() -> Path | None:
    """The newest installed PostgreSQL's bin folder (/usr/lib/postgresql/<version>/bin), None if there is none."""
    found = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/initdb")]
    return max(found, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, default=None)


def as_postgres() -> dict[str, Any]:
    """subprocess.run's arguments that run a program as the `postgres` user when we are root (initdb and the
    server refuse root), else none."""
    return {"user": "postgres", "group": "postgres", "extra_groups": []} if os.geteuid() == 0 else {}


def postgres_run(folder: Path, *command: str) -> None:
    """Run a PostgreSQL program (as_postgres); a failure skips the tests that need the server, saying why."""
    try:
        done = subprocess.run(command, cwd=folder, capture_output=True, text=True, **as_postgres())
    except OSError as exc:  # a partial install, or no right to switch user
        pytest.skip(f"cannot run a PostgreSQL server here: {Path(command[0]).name} failed ({exc})")
    if done.returncode != 0:
        last = (done.stderr.strip() or done.stdout.strip() or f"exit {done.returncode}").splitlines()[-1]
        pytest.skip(f"cannot run a PostgreSQL server here: {Path(command[0]).name} failed ({last})")


# The server's settings: its Unix socket only (no TCP port to collide on), and no fsync (throw-away data).
POSTGRES_SETTINGS = {
    "listen_addresses": "''",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",
}


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Path]:
    """A PostgreSQL server for this test session in a temp folder (initdb, pg_ctl start; trust auth, POSTGRES_SETTINGS).
    Yields the folder, which holds its socket; stopped (immediate) and deleted at the end. Skips the tests that use
    it, saying why, where none can run (no binaries; root without a `postgres` user; initdb or start failing)."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server here (no /usr/lib/postgresql/*/bin/initdb); apt-get install postgresql")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("cannot run a PostgreSQL server here: root, and no `postgres` user to run it as")
    # Not under pytest's tmp_path: its root-only (0700) parents would keep the postgres user out.
    folder = Path(tempfile.mkdtemp(prefix="lenet-pg-"))
    data = folder / "data"
    try:
        if os.geteuid() == 0:
            shutil.chown(folder, "postgres", "postgres")
        initdb = [str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "--no-sync"]
        postgres_run(folder, *initdb, "--encoding=UTF8", "--no-locale")
        settings = {**POSTGRES_SETTINGS, "unix_socket_directories": f"'{folder}'"}
        with open(data / "postgresql.conf", "a") as conf:
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
        postgres_run(folder, str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(folder / "server.log"), "-w", "start")
        yield folder
    finally:
        if (data / "postmaster.pid").exists():
            stop = [str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]
            subprocess.run(stop, cwd=folder, capture_output=True, **as_postgres())
        shutil.rmtree(folder, ignore_errors=True)


def create_database(socket_dir: Path, name: str) -> str:
    """Create database `name` on the test server; returns its URL."""
    createdb = postgres_bin() / "createdb"
    subprocess.run([str(createdb), "-h", str(socket_dir), "-U", "postgres", name], check=True, capture_output=True)
    return f"postgresql://postgres@/{name}?host={socket_dir}"


@pytest.fixture(scope="session")
def postgres_url(postgres_server: Path) -> str:
    """The URL of database `lenet` on the session's PostgreSQL server, shared by the tests that use it."""
    return create_database(postgres_server, "lenet")


@pytest.fixture
def postgres_db(postgres_server: Path) -> Iterator[str]:
    """The URL of a new, empty database for this test alone (dropped afterwards, connections and all)."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    yield create_database(postgres_server, name)
    dropdb = postgres_bin() / "dropdb"
    subprocess.run([str(dropdb), "-h", str(postgres_server), "-U", "postgres", "--force", name], capture_output=True)
