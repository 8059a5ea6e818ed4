"""Shared by the benchmark scripts: rewriting their marked block of docs/benchmarks.md."""

from __future__ import annotations

import sys
from pathlib import Path


def write_block(path: Path, marker: str, text: str) -> None:
    """Replace the text between <!-- marker --> and <!-- /marker --> in `path` (a new file: just that block)."""
    begin, end = f"<!-- {marker} -->", f"<!-- /{marker} -->"
    if not path.exists():
        path.write_text(f"{begin}\n{text}\n{end}\n")
        return
    doc = path.read_text()
    if begin not in doc or end not in doc:
        sys.exit(f"error: {path} has no {begin} ... {end} block; add one where the results should go")
    head, rest = doc.split(begin, 1)
    path.write_text(f"{head}{begin}\n{text}\n{end}{rest.split(end, 1)[1]}")
