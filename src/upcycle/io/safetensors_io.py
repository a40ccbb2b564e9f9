"""Streaming safetensors I/O: read one tensor at a time, write shards without holding them in memory.

Reading uses plain file reads rather than mmap, so tensors already written out do not stay
resident; every header is checked (JSON, dtypes, offsets, file length) before any weight is read,
so a truncated or corrupted file is refused with its name.

Writing follows a plan made in advance (names, shapes, dtypes): each shard's header is written
first, then tensors (or consecutive parts of a tensor, e.g. one expert of a stacked bank) are
appended as they are produced. Peak memory is one part, not one shard.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from upcycle.errors import UpcycleError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and check a safetensors header: {name: TensorInfo}, metadata."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise UpcycleError(f"{path}: truncated safetensors file (no header); re-download or re-save it")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > min(MAX_HEADER, size - 8):
                raise UpcycleError(f"{path}: corrupted safetensors header (length {header_len}, file {size} bytes)")
            header = json.loads(f.read(header_len))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UpcycleError(f"{path}: corrupted safetensors header (not JSON); re-download or re-save it") from None
    if not isinstance(header, dict):
        raise UpcycleError(f"{path}: corrupted safetensors header")
    metadata = header.pop("__metadata__", {}) or {}
    data_start = 8 + header_len
    infos: dict[str, TensorInfo] = {}
    end_max = 0
    for name, entry in header.items():
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise UpcycleError(f"{path}: corrupted safetensors header entry for {name!r}") from None
        itemsize = torch.empty((), dtype=dtype).element_size()
        if end - begin != math.prod(shape) * itemsize or begin < 0:
            raise UpcycleError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {list(shape)}; the file is corrupted")
        end_max = max(end_max, end)
        infos[name] = TensorInfo(path, dtype, shape, data_start + begin, end - begin)
    if data_start + end_max > size:
        raise UpcycleError(f"{path}: truncated safetensors file ({size} bytes, header needs {data_start + end_max}); "
                           "re-download or re-save it")
    return infos, metadata


class SafetensorsReader:
    """All tensors of one or more safetensors files, read lazily by name."""

    def __init__(self, files: Iterable[Path]):
        self.tensors: dict[str, TensorInfo] = {}
        for path in files:
            infos, _ = read_header(Path(path))
            for name, info in infos.items():
                if name in self.tensors:
                    raise UpcycleError(f"{path}: tensor {name!r} also appears in {self.tensors[name].file}")
                self.tensors[name] = info

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self) -> list[str]:
        return list(self.tensors)

    def get(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        buf = bytearray(info.nbytes)
        with open(info.file, "rb") as f:
            f.seek(info.start)
            if f.readinto(buf) != info.nbytes:
                raise UpcycleError(f"{info.file}: truncated while reading {name!r}")
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        return torch.frombuffer(buf, dtype=info.dtype).reshape(info.shape)


def release_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it otherwise, and RSS creeps up over a
    long stream of tensor-sized allocations). A no-op where malloc_trim does not exist."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


# ---------------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def assign_shards(plan: list[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    """Split the plan, in order, into shards of at most max_shard_bytes (a bigger tensor gets its own)."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in plan:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def shard_names(count: int, basename: str = "model") -> list[str]:
    if count == 1:
        return [f"{basename}.safetensors"]
    return [f"{basename}-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


class ShardedWriter:
    """Writes planned tensors into `folder` in plan order; `write` may be called with consecutive
    parts of one tensor (slices along dim 0); a zero-size tensor still takes one call. Call `close()` to write the index; it checks that
    every planned byte was written."""

    def __init__(self, folder: Path, plan: list[PlannedTensor], max_shard_bytes: int, basename: str = "model"):
        names = [t.name for t in plan]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ValueError(f"tensor {dup!r} planned twice")
        self.folder = Path(folder)
        self.shards = assign_shards(plan, max_shard_bytes)
        self.files = shard_names(len(self.shards), basename)
        self.basename = basename
        self._order = [(s, t) for s, shard in enumerate(self.shards) for t in shard]
        self._pos = 0          # index into _order of the tensor being written
        self._written = 0      # bytes of that tensor written so far
        self._file = None
        self._shard = -1
        self.total_bytes = sum(t.nbytes for t in plan)

    def _finish_file(self) -> None:
        """Flush a complete shard to disk, so the folder's final rename never exposes a partial file."""
        if self._file:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def _open(self, shard: int) -> None:
        self._finish_file()
        header, offset = {}, 0
        for t in self.shards[shard]:
            header[t.name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        header["__metadata__"] = {"format": "pt"}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned
        self._file = open(self.folder / self.files[shard], "wb")
        self._file.write(struct.pack("<Q", len(blob)) + blob)
        self._shard = shard

    def write(self, name: str, part: torch.Tensor) -> None:
        if self._pos >= len(self._order):
            raise ValueError(f"tensor {name!r} is not in the plan (all planned tensors are written)")
        shard, planned = self._order[self._pos]
        if name != planned.name:
            raise ValueError(f"expected tensor {planned.name!r} next, got {name!r}")
        if shard != self._shard:
            self._open(shard)
        part = part.detach().to(device="cpu", dtype=planned.dtype).contiguous()
        data = part.reshape(-1).view(torch.uint8).numpy() if part.numel() else b""
        if self._written + len(data) > planned.nbytes:
            raise ValueError(f"tensor {name!r}: {self._written + len(data)} bytes written, planned {planned.nbytes}")
        self._file.write(memoryview(data) if len(data) else b"")
        self._written += len(data)
        if self._written == planned.nbytes:
            self._pos += 1
            self._written = 0

    def close(self) -> list[str]:
        """Finish: flush, check completeness, write model.safetensors.index.json when sharded."""
        if self._pos < len(self._order):
            missing = self._order[self._pos][1].name
            raise ValueError(f"tensor {missing!r} and later ones were never written")
        self._finish_file()
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": {t.name: self.files[s] for s, t in self._order}}
            (self.folder / f"{self.basename}.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return self.files
