"""A stage's record on disk: which config made the folder, what is complete, with content hashes.

It is rewritten atomically (temporary file + rename) after each complete unit of work, so a kill
at any moment leaves either the old record or the new one, never a half-written one, and a
listed checkpoint is always a complete one. Under torchrun only rank 0 writes it (upcycle/distributed.py):
`save` does nothing on the other ranks, which `reload` what rank 0 wrote after waiting for it.

Paths in a manifest (and in the other records a stage writes beside it: lineage.json, the run's
results.json) that lie inside the run folder are stored relative to the folder of the file that
stores them (`stored_path`), so a run folder can be moved whole; every reader resolves them against
the folder where it found the file (`resolve_path`). The run folder is the parent of the stage's
folder (for a recipe's stage, `upcycle run`'s out). Paths outside it (the base model, the user's
data files) are stored absolute. Checkpoint entries (`path`) are relative to the stage's folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from upcycle.errors import UpcycleError
from upcycle.io.atomic import atomic_write_text

MANIFEST = "manifest.json"


def sha256_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def stored_path(path: str | Path, folder: str | Path, run_folder: str | Path | None = None) -> str:
    """How a record in `folder` stores `path`: relative to `folder` when it lies inside the run
    folder (default: `folder`'s parent), else absolute."""
    full, folder = os.path.abspath(path), os.path.abspath(folder)
    run = os.path.abspath(run_folder) if run_folder is not None else os.path.dirname(folder)
    if full == run or full.startswith(run.rstrip(os.sep) + os.sep):
        return Path(os.path.relpath(full, folder)).as_posix()
    return full


def resolve_path(stored: str | Path, folder: str | Path) -> Path:
    """A path read from a record found in `folder`: a relative one is relative to that folder."""
    return Path(os.path.normpath(Path(folder) / stored)) if not Path(stored).is_absolute() else Path(stored)


class Manifest:
    def __init__(self, folder: Path, data: dict[str, Any]):
        self.folder = Path(folder)
        self.data = data

    @classmethod
    def open(cls, folder: str | Path, stage: str, config_hash: str, force: bool = False,
             initial: dict | None = None) -> "Manifest":
        """The folder's manifest for this stage and config, or a new one in an empty folder.

        A folder made by another config is refused unless `force`, which clears it first.
        """
        folder = Path(folder)
        path = folder / MANIFEST
        if path.is_file():
            data = json.loads(path.read_text())
            if data.get("stage") == stage and data.get("config_hash") == config_hash:
                return cls(folder, data)
            if not force:
                raise UpcycleError(
                    f"out {folder}: made by a different {data.get('stage')} config (hash {data.get('config_hash')}, "
                    f"now {config_hash}); choose another out, or pass --force to start over")
            shutil.rmtree(folder)
        elif folder.is_dir() and any(folder.iterdir()):
            if not force:
                raise UpcycleError(f"out {folder}: folder is not empty and has no {MANIFEST}; choose another out or pass --force")
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        m = cls(folder, {"stage": stage, "config_hash": config_hash, "complete": False, "checkpoints": [], **(initial or {})})
        m.save()
        return m

    def save(self) -> None:
        from upcycle.distributed import is_main

        if is_main():
            atomic_write_text(self.folder / MANIFEST, json.dumps(self.data, indent=2, default=str))

    def reload(self) -> "Manifest":
        """What rank 0 wrote (call it once every rank has waited for rank 0)."""
        self.data = json.loads((self.folder / MANIFEST).read_text())
        return self

    @property
    def checkpoints(self) -> list[dict]:
        return self.data["checkpoints"]

    @property
    def complete(self) -> bool:
        return bool(self.data.get("complete"))

    def add_checkpoint(self, entry: dict) -> None:
        self.checkpoints.append(entry)
        self.save()
