"""A Hugging Face model folder on disk: its config, weights, tokenizer files, checked before use.

Everything here reads headers and small JSON files only; weights are read later, one tensor at a
time. Pickle weights (.bin/.pt) are refused unless the user allows them, and then read with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch

from upcycle.dense_config import normalize_config, read_config_json
from upcycle.errors import UpcycleError
from upcycle.io.safetensors_io import DTYPE_NAMES, SafetensorsReader, check_dtype, check_finite

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json",
)
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth")


class PickleReader:
    """Weights from .bin/.pt files, loaded with weights_only=True (no code execution)."""

    def __init__(self, files: list[Path]):
        self.state: dict[str, torch.Tensor] = {}
        self.files: dict[str, Path] = {}
        for f in files:
            try:
                part = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # noqa: BLE001 - report any unpickling failure with the file name
                raise UpcycleError(f"{f}: cannot read as weights-only torch file ({type(e).__name__}: {e})") from None
            for name, t in part.items():  # the same dtype rule as safetensors weights (no int8/float8)
                check_dtype(f, name, DTYPE_NAMES.get(t.dtype, str(t.dtype)))
            self.state.update(part)
            self.files.update({name: f for name in part})
        self.tensors = {k: v for k, v in self.state.items()}

    def __contains__(self, name: str) -> bool:
        return name in self.state

    def names(self) -> list[str]:
        return list(self.state)

    def get(self, name: str) -> torch.Tensor:
        return check_finite(self.files[name], name, self.state[name])


class ModelFolder:
    """A local HF model folder. Construction validates it (no weights read)."""

    def __init__(self, path: str | Path, allow_pickle: bool = False, what: str = "base"):
        self.path = Path(path)
        self.what = what
        if not self.path.exists():
            raise UpcycleError(f"{what} {self.path}: folder not found; give a local Hugging Face model folder, a "
                               "bundled:NAME (`upcycle models` lists them) or a hub id org/name[@revision]")
        if not self.path.is_dir():
            raise UpcycleError(f"{what} {self.path}: not a folder; give a local Hugging Face model folder")
        cfg_path = self.path / "config.json"
        if not cfg_path.is_file():
            raise UpcycleError(f"{what} {self.path}: no config.json; is this a Hugging Face model folder?")
        self.raw_config: dict = read_config_json(cfg_path)  # as on disk
        # A dense config as transformers reads it, whatever version wrote it (upcycle.dense_config).
        self.config: dict = normalize_config(self.raw_config, cfg_path)
        self.weight_files, self.is_pickle = self._find_weights(allow_pickle)

    def _find_weights(self, allow_pickle: bool) -> tuple[list[Path], bool]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UpcycleError(f"{index}: not a valid safetensors index (needs a weight_map)") from None
            files = sorted({self.path / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise UpcycleError(f"{index}: lists shard(s) {', '.join(missing)} that are not in {self.path}")
            return files, False
        files = sorted(self.path.glob("*.safetensors"))
        if files:
            return files, False
        pickles = sorted(p for pat in PICKLE_PATTERNS for p in self.path.glob(pat) if p.name != "training_args.bin")
        if pickles:
            if not allow_pickle:
                raise UpcycleError(
                    f"{self.what} {self.path}: only pickle weights ({pickles[0].name}); pickle files can run code when loaded. "
                    "Convert them to safetensors, or pass --allow-pickle to read them with torch.load(weights_only=True)"
                )
            return pickles, True
        raise UpcycleError(f"{self.what} {self.path}: no weights (*.safetensors) found")

    @property
    def model_type(self) -> str | None:
        return self.config.get("model_type")

    def reader(self):
        """Checks every safetensors header (truncation, corruption) and returns a lazy reader."""
        return PickleReader(self.weight_files) if self.is_pickle else SafetensorsReader(self.weight_files)

    def tokenizer_files(self) -> list[Path]:
        return [self.path / n for n in TOKENIZER_FILES if (self.path / n).is_file()]

    def copy_tokenizer(self, out: Path) -> list[str]:
        copied = []
        for f in self.tokenizer_files():
            shutil.copy2(f, out / f.name)
            copied.append(f.name)
        return copied

    def fingerprint(self) -> str:
        """A cheap identity for the weights: config + every weight file's header and size.

        Hashing multi-GB files would take minutes; headers name every tensor with its shape, dtype
        and offsets, so any re-save or different model changes them.
        """
        h = hashlib.sha256((self.path / "config.json").read_bytes())
        for f in self.weight_files:
            h.update(f.name.encode())
            h.update(str(f.stat().st_size).encode())
            with open(f, "rb") as fh:
                h.update(fh.read(1 << 20))
        return h.hexdigest()[:16]


QUICK_SAMPLES = 16
QUICK_CHUNK = 1 << 16


def quick_fingerprint(files: list[Path]) -> str:
    """Names, sizes and QUICK_SAMPLES chunks spread over each file: equal for identical files and
    almost never for different ones (a candidate for a full hash, manifest.sha256_files, which decides)."""
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            for i in range(QUICK_SAMPLES):
                fh.seek(size * i // QUICK_SAMPLES)
                h.update(fh.read(QUICK_CHUNK))
    return h.hexdigest()

