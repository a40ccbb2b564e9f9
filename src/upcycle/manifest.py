"""A stage's record on disk: which config made the folder, what is complete, with content hashes.

It is rewritten atomically (temporary file + rename) after each complete unit of work, so a kill
at any moment leaves either the old record or the new one, never a half-written one, and a
listed checkpoint is always a complete one. Under torchrun only rank 0 writes it (upcycle/distributed.py):
`save` does nothing on the other ranks, which `reload` what rank 0 wrote after waiting for it.
"""

from __future__ import annotations

import hashlib
import json
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
