"""Outputs appear whole or not at all: write into a hidden temporary folder, rename when complete."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

from upcycle.errors import UpcycleError


def check_output_dir(out: Path, force: bool) -> None:
    """Refuse a non-empty output folder unless force; refuse a path that is a file."""
    if out.exists() and not out.is_dir():
        raise UpcycleError(f"out {out}: exists and is not a folder; choose another path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UpcycleError(f"out {out}: folder is not empty; choose another path or pass --force to replace it")


@contextlib.contextmanager
def atomic_dir(out: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `out`, on any error it is removed.

    A previous `out` is only removed once the new one is complete, so a failed run with --force
    leaves the old result in place.
    """
    out = Path(out)
    check_output_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(text)
    os.replace(tmp, path)
