"""Instruction data: read rows from a file, a saved `datasets` folder or a hub data set, and turn each
into a conversation.

Sources (`data.train` entries):
  FILE.jsonl / FILE.json     one JSON object per line / a JSON list of objects (or {"data": [...]})
  FILE.parquet / FILE.csv    columns as keys (CSV: a header row; every value a string)
  FOLDER                     a folder written by `datasets`' save_to_disk (its train split)
  hf:ORG/NAME[:SPLIT]        a data set by its hub name through `datasets`' cache (split: train);
                             offline (HF_HUB_OFFLINE=1 / HF_DATASETS_OFFLINE=1) the cached copy
Schemas, detected per source from its first row unless `data.schema` says:
  alpaca    {"instruction": ..., "input": ... (optional), "output": ...}
  messages  {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]} (OpenAI)
  sharegpt  {"conversations": [{"from": "system"|"human"|"gpt", "value": ...}, ...]}
`data.columns` maps a schema's keys to the ones a file uses ({instruction: question, output:
answer}, or {conversations: dialog}). Extra keys are kept as metadata (e.g. "domain", used by
routing analysis). A bad row is an error naming its source and row, or, with `on_bad_row: skip`,
skipped and counted by reason.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

from upcycle.errors import UpcycleError

Schema = Literal["auto", "alpaca", "messages", "sharegpt"]
ROLES = ("system", "user", "assistant")
# ShareGPT's speaker names (and those other dumps use) -> roles
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "model": "assistant"}
HUB_DATA = "hf:"
FILE_TYPES = (".jsonl", ".json", ".parquet", ".csv")


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


def iter_rows(source: str | Path) -> Iterator[tuple[str, Any]]:
    """(where, row) pairs: 'file:line' for JSONL and CSV, 'file[i]' for the others."""
    text = str(source)
    if text.startswith(HUB_DATA):
        yield from _iter_hub(text)
        return
    path = Path(source)
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
    elif path.suffix == ".parquet":
        yield from _iter_parquet(path)
    elif path.suffix == ".csv":
        yield from _iter_csv(path)
    else:
        raise UpcycleError(f"data {path}: unknown file type {path.suffix!r}; use {', '.join(FILE_TYPES)}, a datasets "
                           "folder, or hf:ORG/NAME[:SPLIT]")


def _iter_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types; name the file
        raise UpcycleError(f"data {path}: not a parquet file ({type(e).__name__}: {e})") from None
    i = 0
    for batch in table.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            yield f"{path}[{i}]", row
            i += 1


def _iter_csv(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            for row in reader:
                yield f"{path}:{reader.line_num}", row
    except UnicodeDecodeError:
        raise UpcycleError(f"data {path}: not UTF-8 text (a binary file?); give a CSV file with a header row") from None
    except csv.Error as e:
        raise UpcycleError(f"data {path}: not a CSV file ({e})") from None


def hub_dataset_name(entry: str) -> tuple[str, str]:
    """`hf:ORG/NAME[:SPLIT]` -> (ORG/NAME, SPLIT); the split defaults to train."""
    repo, _, split = entry.removeprefix(HUB_DATA).partition(":")
    if not repo or "/" not in repo:
        raise UpcycleError(f"data {entry}: a hub data set is hf:ORG/NAME or hf:ORG/NAME:SPLIT")
    return repo, split or "train"


def load_hub_dataset(entry: str):
    """The split of a hub data set, through `datasets`' cache (offline: the cached copy only)."""
    repo, split = hub_dataset_name(entry)
    try:
        from datasets import load_dataset
    except ImportError:
        raise UpcycleError(f"data {entry}: reading a hub data set needs the `datasets` package (pip install datasets)") from None
    try:
        return load_dataset(repo, split=split)
    except Exception as e:  # noqa: BLE001 - datasets raises many types (offline, missing split, gated): name it
        reason = " ".join(str(e).split())[:300]
        raise UpcycleError(f"data {entry}: cannot load split {split!r} of {repo} ({type(e).__name__}: {reason}); "
                           f"fetch it where there is a network (python -c \"import datasets; datasets.load_dataset("
                           f"'{repo}', split='{split}')\"), or give a local file") from None


def _iter_hub(entry: str) -> Iterator[tuple[str, Any]]:
    for i, row in enumerate(load_hub_dataset(entry)):
        yield f"{entry}[{i}]", row


def count_rows(source: str | Path) -> int:
    """How many rows a data source holds, without building conversations."""
    text = str(source)
    if text.startswith(HUB_DATA):
        return len(load_hub_dataset(text))
    path = Path(source)
    if path.is_dir():
        return sum(1 for _ in _iter_datasets_folder(path, rows=False))
    if path.suffix == ".jsonl":
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip())
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
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
        if isinstance(row.get("conversations"), list):
            return "sharegpt"
        if "instruction" in row and "output" in row:
            return "alpaca"
    return None


def map_columns(row: Any, columns: dict[str, str] | None) -> Any:
    """`row` with the file's keys renamed to the schema's (`columns`: {schema key: file key})."""
    if not columns or not isinstance(row, dict):
        return row
    renamed = {k: v for k, v in row.items() if k not in columns.values()}
    for ours, theirs in columns.items():
        if theirs in row:
            renamed[ours] = row[theirs]
    return renamed


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
    elif schema == "sharegpt":
        raw = row.get("conversations")
        if not isinstance(raw, list) or not raw:
            raise BadRow("'conversations' must be a non-empty list")
        messages = []
        for i, m in enumerate(raw):
            speaker = str(m.get("from", "")).lower() if isinstance(m, dict) else ""
            if speaker not in SHAREGPT_ROLES or not isinstance(m.get("value"), str):
                raise BadRow(f"turn {i} must be {{'from': one of human/gpt/system, 'value': str}}"
                             + (f", got from={m.get('from')!r}" if isinstance(m, dict) else ""))
            messages.append({"role": SHAREGPT_ROLES[speaker], "content": m["value"]})
        _require_response(messages)
        meta = {k: v for k, v in row.items() if k != "conversations"}
    else:
        raw = row.get("messages")
        if not isinstance(raw, list) or not raw:
            raise BadRow("'messages' must be a non-empty list")
        messages = []
        for i, m in enumerate(raw):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise BadRow(f"message {i} must be {{'role': one of {ROLES}, 'content': str}}")
            messages.append({"role": m["role"], "content": m["content"]})
        _require_response(messages)
        meta = {k: v for k, v in row.items() if k != "messages"}
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return Conversation(messages, source, meta)


def _require_response(messages: list[dict]) -> None:
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise BadRow("no assistant response")


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


def unknown_schema(source: str, row: Any) -> UpcycleError:
    keys = sorted(row) if isinstance(row, dict) else type(row).__name__
    return UpcycleError(f"data {source}: unknown schema (keys {keys}); expected instruction/input/output (alpaca), "
                        "messages (role/content) or conversations (from/value: ShareGPT); set data.schema, or map the "
                        "file's keys with data.columns (e.g. data.columns={instruction: question, output: answer})")


def load_conversations(paths: list[str | Path], schema: Schema = "auto", on_bad_row: str = "error",
                       system_prompt: str | None = None, columns: dict[str, str] | None = None
                       ) -> tuple[list[Conversation], LoadReport]:
    """Every conversation in `paths` (files, folders, hf: names), in order. Raises UpcycleError for an
    empty dataset or bad rows."""
    report = LoadReport()
    out: list[Conversation] = []
    for path in paths:
        file_schema = None if schema == "auto" else schema
        for source, row in iter_rows(path):
            report.rows += 1
            row = map_columns(row, columns)
            if file_schema is None:
                file_schema = detect_schema(row)
                if file_schema is None:
                    raise unknown_schema(source, row)
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


def describe_source(entry: str) -> str:
    """A data source for a record others read (a model card): its name and content hash, never a
    local path (`/home/me/data/alpaca.jsonl` -> `alpaca.jsonl (sha256 1a2b3c4d5e6f)`)."""
    from upcycle.manifest import sha256_files

    if entry == "suite" or entry.startswith(HUB_DATA):
        return entry
    path = Path(entry)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.is_file() else []
    return f"{path.name} (sha256 {sha256_files(files)[:12]})" if files else path.name
