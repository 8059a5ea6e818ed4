"""Output paths: create folders and write files, turning any OSError into one `OutputError` line that
names the path, the reason (read-only, not a folder, permission denied, disk full) and the fix."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path

from ablation.errors import OutputError

# errno -> why the write failed, in words (anything else: the OS's own message).
REASONS = {
    errno.EROFS: "the file system is read-only",
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EEXIST: "it is a file, not a folder",
    errno.EISDIR: "it is a folder, not a file",
    errno.ENOENT: "its folder does not exist and cannot be created there",
    errno.ENAMETOOLONG: "the name is too long",
}


def output_error(path: Path, exc: OSError, what: str, fix: str) -> OutputError:
    """The one-line error for a failed write of `what` at `path`."""
    reason = REASONS.get(exc.errno or 0) or exc.strerror or type(exc).__name__
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = f"free some space, or {fix}"
    return OutputError(f"cannot write {what} {path}: {reason}; {fix}")


def make_dir(path: Path, what: str = "output folder", fix: str = "choose another folder") -> Path:
    """Create folder `path` and its parents (nothing if it exists); returns `path`."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # FileExistsError (EEXIST) when `path` is a file
        raise output_error(path, exc, what, fix) from None
    return path


def writable_dir(path: Path, what: str = "output folder", fix: str = "choose another folder") -> Path:
    """`make_dir`, then prove a file can be created in the folder; returns `path`."""
    make_dir(path, what, fix)
    try:
        # mkdir succeeds on an existing read-only folder: only creating a file proves it is writable.
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise output_error(Path(path), exc, what, fix) from None
    return Path(path)


def write_text(path: Path, text: str, what: str = "file", fix: str = "choose another path") -> None:
    """Write `text` (UTF-8) to `path` atomically, as `write_bytes` does."""
    write_bytes(path, text.encode("utf-8"), what, fix)


def write_bytes(path: Path, data: bytes, what: str = "file", fix: str = "choose another path") -> None:
    """Write `data` to `path` atomically (a temporary file, then a rename): a failed write leaves the old
    file, if any, as it was and no temporary file behind."""
    path = Path(path)
    if path.is_dir():  # checked first: the rename below would otherwise fail with a less direct reason
        raise output_error(path, IsADirectoryError(errno.EISDIR, "Is a directory"), what, fix)
    make_dir(path.parent, f"folder for {what}", fix)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise output_error(path, exc, what, fix) from None
