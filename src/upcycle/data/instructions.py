"""Instruction data: read rows from JSONL / JSON / a local `datasets` folder, turn each into a conversation.

Two schemas are understood, detected per file from its first row unless `data.schema` says:
  alpaca    {"instruction": ..., "input": ... (optional), "output": ...}
  messages  {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}
Extra keys are kept as metadata (e.g. "domain", used by routing analysis). A bad row is an error
naming its file and line, or, with `on_bad_row: skip`, skipped and counted by reason.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

from upcycle.errors import UpcycleError

Schema = Literal["auto", "alpaca", "messages"]
ROLES = ("system", "user", "assistant")


@dataclass
class Conversation:
    messages: list[dict[str, str]]
    source: str  # "file:line", for error messages
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def domain(self) -> str | None:
        return self.meta.get("domain")


class BadRow(ValueError):
    """A row that cannot become a conversation; the message says why."""


def iter_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(source, row) pairs. JSONL sources are 'file:line'; JSON arrays 'file[i]'; datasets 'dir[i]'."""
    if not path.exists():
        raise UpcycleError(f"data {path}: not found")
    if path.is_dir():
        yield from _iter_datasets_folder(path)
    elif path.suffix == ".jsonl":
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise UpcycleError(f"data {path}:{lineno}: not UTF-8 text (a binary file?); give a JSONL file, "
                                       "one JSON object per line") from None
                if not line.strip():
                    continue
                try:
                    yield f"{path}:{lineno}", json.loads(line)
                except json.JSONDecodeError as e:
                    yield f"{path}:{lineno}", BadRow(f"not valid JSON ({e.msg})")
    elif path.suffix == ".json":
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError:
            raise UpcycleError(f"data {path}: not UTF-8 text (a binary file?); give a JSON list of rows") from None
        except json.JSONDecodeError as e:
            raise UpcycleError(f"data {path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise UpcycleError(f"data {path}: a JSON file must hold a list of rows (or {{\"data\": [...]}})")
        for i, row in enumerate(data):
            yield f"{path}[{i}]", row
    else:
        raise UpcycleError(f"data {path}: unknown file type {path.suffix!r}; use .jsonl, .json or a datasets folder")


def count_rows(path: Path) -> int:
    """How many rows a data file or folder holds, without building conversations."""
    if path.is_dir():
        return sum(1 for _ in _iter_datasets_folder(path, rows=False))
    if path.suffix == ".jsonl":
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip())
    return sum(1 for _ in iter_rows(path))


def _iter_datasets_folder(path: Path, rows: bool = True) -> Iterator[tuple[str, Any]]:
    try:
        from datasets import load_from_disk
    except ImportError:
        raise UpcycleError(f"data {path}: reading a datasets folder needs the `datasets` package (pip install datasets)") from None
    try:
        ds = load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - datasets raises many types; name the folder
        raise UpcycleError(f"data {path}: not a folder saved with datasets.save_to_disk ({e})") from None
    if hasattr(ds, "keys"):  # a DatasetDict: take "train"
        if "train" not in ds:
            raise UpcycleError(f"data {path}: a DatasetDict without a 'train' split ({list(ds.keys())})")
        ds = ds["train"]
    if not rows:  # only the count
        yield from ((f"{path}[{i}]", None) for i in range(len(ds)))
        return
    for i, row in enumerate(ds):
        yield f"{path}[{i}]", row


def detect_schema(row: Any) -> str | None:
    if isinstance(row, dict):
        if isinstance(row.get("messages"), list):
            return "messages"
        if "instruction" in row and "output" in row:
            return "alpaca"
    return None


def _text(row: dict, key: str, required: bool) -> str:
    value = row.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise BadRow(f"no {key!r}" if value is None else f"empty {key!r}")
        return ""
    if not isinstance(value, str):
        raise BadRow(f"{key!r} must be a string, got {type(value).__name__}")
    return value


def to_conversation(row: Any, schema: str, source: str, system_prompt: str | None = None) -> Conversation:
    if isinstance(row, BadRow):
        raise row
    if not isinstance(row, dict):
        raise BadRow(f"a row must be a JSON object, got {type(row).__name__}")
    if schema == "alpaca":
        instruction = _text(row, "instruction", required=True)
        extra = _text(row, "input", required=False)
        output = _text(row, "output", required=True)
        user = f"{instruction}\n\n{extra}" if extra else instruction
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        meta = {k: v for k, v in row.items() if k not in ("instruction", "input", "output")}
    else:
        raw = row.get("messages")
        if not isinstance(raw, list) or not raw:
            raise BadRow("'messages' must be a non-empty list")
        messages = []
        for i, m in enumerate(raw):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise BadRow(f"message {i} must be {{'role': one of {ROLES}, 'content': str}}")
            messages.append({"role": m["role"], "content": m["content"]})
        if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
            raise BadRow("no assistant response")
        meta = {k: v for k, v in row.items() if k != "messages"}
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return Conversation(messages, source, meta)


@dataclass
class LoadReport:
    rows: int = 0
    conversations: int = 0
    skipped: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        s = f"{self.conversations} conversations from {self.rows} rows"
        if self.skipped:
            s += " (skipped: " + ", ".join(f"{n} {why}" for why, n in self.skipped.most_common()) + ")"
        return s


def load_conversations(paths: list[Path], schema: Schema = "auto", on_bad_row: str = "error",
                       system_prompt: str | None = None) -> tuple[list[Conversation], LoadReport]:
    """Every conversation in `paths`, in order. Raises UpcycleError for an empty dataset or bad rows."""
    report = LoadReport()
    out: list[Conversation] = []
    for path in paths:
        file_schema = None if schema == "auto" else schema
        for source, row in iter_rows(Path(path)):
            report.rows += 1
            if file_schema is None:
                file_schema = detect_schema(row)
                if file_schema is None:
                    keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                    raise UpcycleError(f"data {source}: unknown schema (keys {keys}); expected instruction/input/output "
                                       "or messages, or set data.schema")
            try:
                out.append(to_conversation(row, file_schema, source, system_prompt))
            except BadRow as e:
                if on_bad_row == "skip":
                    report.skipped[str(e)] += 1
                    continue
                raise UpcycleError(f"data {source}: {e} (set data.on_bad_row=skip to skip such rows)") from None
    report.conversations = len(out)
    if not out:
        where = ", ".join(map(str, paths))
        raise UpcycleError(f"data {where}: no usable rows ({report.summary()})")
    return out, report
