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
WEIGHT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})
"""What a model's weights may be stored as. Integer and 8-bit float tensors are quantized weights
(int8, GPTQ, FP8): copying them into experts or merging them as if they were weights writes a
different model (int8 routers come out all zero), so they are refused until dequantized."""
QUANTIZED_DTYPES = frozenset({"I8", "U8", "I16", "U16", "I32", "U32", "I64", "U64", "BOOL", "F8_E4M3",
                              "F8_E4M3FNUZ", "F8_E5M2", "F8_E5M2FNUZ", "F8_E8M0", "F6_E2M3", "F6_E3M2", "F4", "C64"})
"""The other dtypes the safetensors format defines: named as such in the refusal, not as corruption."""
MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def check_dtype(path: Path, name: str, code: str, allowed: frozenset[str] = WEIGHT_DTYPES) -> None:
    """Refuse a tensor stored as `code` (a safetensors dtype name, e.g. DTYPE_NAMES[t.dtype]) outside `allowed`."""
    if code not in allowed:
        raise UpcycleError(f"{path}: tensor {name!r} is stored as {code}; upcycle reads weights in "
                           f"{', '.join(sorted(allowed))} only: dequantize the checkpoint first (e.g. load it with "
                           "transformers and save_pretrained in bfloat16)")


def _is_count(x) -> bool:
    """A JSON non-negative integer (not a bool, not a float such as 2.5 that int() would truncate)."""
    return type(x) is int and x >= 0


def _entry(path: Path, name: str, entry, allowed: frozenset[str]) -> tuple[str, tuple[int, ...], int, int]:
    """One header entry checked: (dtype code, shape, begin, end) relative to the data section."""
    bad = f"{path}: corrupted safetensors header: tensor {name!r}"
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise UpcycleError(f"{bad} needs dtype, shape and data_offsets; re-download or re-save the file")
    code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise UpcycleError(f"{bad} has shape {shape!r}; dimensions must be non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(x) for x in offsets) or offsets[0] > offsets[1]:
        raise UpcycleError(f"{bad} has data_offsets {offsets!r}; expected [begin, end] with 0 <= begin <= end")
    if code in DTYPES or code in QUANTIZED_DTYPES:
        check_dtype(path, name, code, allowed)
    if code not in allowed:
        raise UpcycleError(f"{bad} has unknown dtype {code!r}")
    begin, end = offsets
    itemsize = torch.empty((), dtype=DTYPES[code]).element_size()
    if end - begin != math.prod(shape) * itemsize:
        raise UpcycleError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {shape} ({code}); "
                           "the file is corrupted")
    return code, tuple(shape), begin, end


def read_header(path: Path, allowed: frozenset[str] = WEIGHT_DTYPES) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and check a safetensors header: {name: TensorInfo}, metadata.

    The checks are the reference library's (tensors tile the data section exactly, no overlap, no
    gap, no trailing bytes) plus the dtype policy `allowed`, so a file either loads in transformers
    and here alike, or is refused here with its name and the offending tensor before anything is written.
    """
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
    except RecursionError:
        raise UpcycleError(f"{path}: corrupted safetensors header (JSON nested too deeply); re-download or re-save it") from None
    if not isinstance(header, dict):
        raise UpcycleError(f"{path}: corrupted safetensors header (a JSON {type(header).__name__}, not a mapping of tensors)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise UpcycleError(f"{path}: corrupted safetensors header: __metadata__ must map strings to strings")
    data_start = 8 + header_len
    entries = sorted(((_entry(path, name, entry, allowed), name) for name, entry in header.items()), key=lambda e: e[0][2:])
    infos: dict[str, TensorInfo] = {}
    at, previous = 0, None
    for (code, shape, begin, end), name in entries:
        if begin != at:
            before = f"tensor {previous!r} ends at byte {at}" if previous else "the data starts at byte 0"
            raise UpcycleError(f"{path}: corrupted safetensors header: tensor {name!r} starts at byte {begin} but {before} "
                               f"({'an overlap' if begin < at else 'a gap'}); re-download or re-save the file")
        infos[name] = TensorInfo(path, DTYPES[code], shape, data_start + begin, end - begin)
        at, previous = end, name
    if data_start + at > size:
        raise UpcycleError(f"{path}: truncated safetensors file ({size} bytes, header needs {data_start + at}); "
                           "re-download or re-save it")
    if data_start + at < size:
        raise UpcycleError(f"{path}: corrupted safetensors file: {size - data_start - at} bytes after the last tensor "
                           "that no header entry covers; re-download or re-save it")
    return {name: infos[name] for name in header}, metadata


def check_finite(path: Path, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Refuse a weight holding NaN or inf, naming the file and tensor: a diverged or corrupted
    checkpoint would otherwise be copied or merged silently into every output built from it."""
    if tensor.is_floating_point() and tensor.numel() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise UpcycleError(f"{path}: tensor {name!r} holds {bad} NaN/inf value{'s' if bad > 1 else ''} of "
                           f"{tensor.numel()}; a diverged or corrupted checkpoint: retrain or re-download it, or "
                           "leave it out")
    return tensor


class SafetensorsReader:
    """All tensors of one or more safetensors files, read lazily by name; every header is checked
    when the reader is made, and every tensor is checked for NaN/inf as it is read (`check_finite`:
    no second read). `dtypes`: the dtype codes accepted (model weights by default)."""

    def __init__(self, files: Iterable[Path], dtypes: frozenset[str] = WEIGHT_DTYPES):
        self.tensors: dict[str, TensorInfo] = {}
        for path in files:
            infos, _ = read_header(Path(path), dtypes)
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
        return check_finite(info.file, name, torch.frombuffer(buf, dtype=info.dtype).reshape(info.shape))


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
