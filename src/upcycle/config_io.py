"""Configs in and out: YAML files (with `extends`), `key=value` overrides, one validation pass
against the schema (upcycle/config.py) that reports every problem at once with its key, the
resolved config written beside every output, and the hash that says which config made a folder.

    cfg = load_config(RouteConfig, "route.yaml", ["seed_count=64", "moe.top_k=2"])
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from upcycle.config import SectionProblems
from upcycle.errors import UpcycleError
from upcycle.io.user_files import load_yaml

def parse_overrides(items: list[str]) -> dict[str, Any]:
    """['moe.top_k=4', 'base=/m'] -> nested dict; values are parsed as YAML scalars/lists."""
    nested: dict[str, Any] = {}
    bad = []
    for item in items:
        if "=" not in item:
            bad.append(f"override {item!r}: expected key=value (e.g. moe.top_k=2)")
            continue
        key, raw = item.split("=", 1)
        try:
            value = load_yaml(raw, f"override {key.strip()}") if raw != "" else ""
        except UpcycleError as e:
            if "not valid YAML" not in str(e):
                raise
            value = raw
        set_dotted(nested, key.strip(), value)
    if bad:
        raise UpcycleError(*bad)
    return nested


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UpcycleError(f"override {dotted}: {part} is a value, not a section")
    node[parts[-1]] = value


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: str | Path, _seen: tuple = ()) -> dict[str, Any]:
    """A YAML mapping (size- and alias-bounded: upcycle/io/user_files.py). `extends:` names the file(s)
    this one builds on, relative to it: one path, or a list merged left to right (a later file
    overrides an earlier one); this file's own keys override them all."""
    from upcycle.io.user_files import read_yaml_file

    path = Path(path)
    data = read_yaml_file(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UpcycleError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    parents = data.pop("extends", None)
    if parents is None:
        return data
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not parents or not all(isinstance(p, str) and p for p in parents):
        raise UpcycleError(f"{path}: extends: {parents!r}; give a file name or a list of file names "
                           "(e.g. extends: upit_lora.yaml)")
    merged: dict[str, Any] = {}
    for parent in parents:
        parent_path = (path.parent / parent).resolve()
        if parent_path in _seen or parent_path == path.resolve():
            raise UpcycleError(f"{path}: extends {parent} makes a cycle")
        merged = deep_merge(merged, read_yaml(parent_path, _seen + (path.resolve(), parent_path)))
    return deep_merge(merged, data)


def read_yaml_value(path: str | Path, what: str = "file") -> Any:
    """Any YAML (or JSON) value in a file, bounded as configs are (prompts files, ...)."""
    from upcycle.io.user_files import read_yaml_file

    if not Path(path).is_file():
        raise UpcycleError(f"{path}: {what} not found")
    return read_yaml_file(path)


def format_validation_error(err: ValidationError, source: str = "") -> list[str]:
    where = f"{source}: " if source else ""
    lines = []
    for e in err.errors():
        key = ".".join(str(x) for x in e["loc"]) or "(top level)"
        section = (e.get("ctx") or {}).get("error")
        if isinstance(section, SectionProblems):
            prefix = "".join(f"{x}." for x in e["loc"])
            lines.extend(f"{where}{p}" for p in section.render(prefix))
        elif e["type"] == "extra_forbidden":
            lines.append(f"{where}{key}: unknown key; check the spelling (`upcycle validate` lists valid keys in the error context)")
        elif e["type"] == "missing":
            lines.append(f"{where}{key}: required, not given")
        else:
            got = e.get("input")
            lines.append(f"{where}{key}: {e['msg']} (got {got!r})")
    return lines


def load_config(schema: type[BaseModel], path: str | Path | None = None, overrides: list[str] | None = None,
                values: dict[str, Any] | None = None):
    """Build a validated `schema` instance from a YAML file, explicit values and key=value overrides.

    Later sources win: file < values (CLI flags) < overrides. All problems are raised together, the
    sections' cross-field ones (their validators) included.
    """
    data: dict[str, Any] = read_yaml(path) if path else {}
    if values:
        data = deep_merge(data, values)
    if overrides:
        data = deep_merge(data, parse_overrides(overrides))
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise UpcycleError(*format_validation_error(e, str(path) if path else "")) from None


def dump_config(cfg: BaseModel, path: Path) -> None:
    """Write the resolved config (every default filled in) as YAML."""
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True), sort_keys=False))


EVAL_KEYS = ("evaluate", "eval_max_items", "eval_checkpoints")
"""What is scored, not what is trained: left out of a stage's config hash, so changing them
re-evaluates a finished stage and never retrains it (pipeline.py)."""


def config_hash(cfg: BaseModel, exclude: set[str] = frozenset({"force", "out", *EVAL_KEYS}),
                anchor: str | Path | None = None) -> str:
    """A stable hash of everything that changes a stage's trained result (not where it is written,
    not how it is scored).

    It does not depend on where the run folder lies, so a run folder can be moved: a path in the
    config that lies inside the anchor folder is hashed as `<anchor>/` plus its path relative to it
    (the saved config keeps the path as given). The anchor is the parent of the stage's `out` (for a
    recipe's stage: the run folder, which the pipeline passes as `anchor`); the branch stage passes
    its own anchor to its per-domain prepare runs, whose data lies in the branch folder beside them.
    A config without `out` and no anchor hashes its paths as they are.
    """
    import hashlib
    import json

    if anchor is None and getattr(cfg, "out", None) is not None:
        anchor = Path(cfg.out).parent
    data = _without(cfg.model_dump(mode="json", by_alias=True, exclude=set(exclude)), LOGGING_KEYS)
    if anchor is not None:
        data = _anchored(data, os.path.abspath(anchor))
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


LOGGING_KEYS = ("report_to",)
"""Where the logs go, at any depth of a config: never part of its hash."""


def _without(value: Any, keys: tuple[str, ...]) -> Any:
    if isinstance(value, dict):
        return {k: _without(v, keys) for k, v in value.items() if k not in keys}
    if isinstance(value, list):
        return [_without(v, keys) for v in value]
    return value


def _anchored(value: Any, anchor: str) -> Any:
    """`value` with each path string inside `anchor` (an absolute folder) written relative to it;
    a path after a `name:` prefix (post_train's `prepare:FOLDER`) too."""
    if isinstance(value, dict):
        return {k: _anchored(v, anchor) for k, v in value.items()}
    if isinstance(value, list):
        return [_anchored(v, anchor) for v in value]
    if not isinstance(value, str):
        return value
    head, colon, tail = value.partition(":")
    prefix, path = (head + colon, tail) if colon and head.isidentifier() else ("", value)
    if not (os.path.isabs(path) or "/" in path or os.sep in path):  # a name (suite, bundled:..., lora), not a path
        return value
    full = os.path.abspath(path)
    if full != anchor and not full.startswith(anchor.rstrip(os.sep) + os.sep):
        return value
    return prefix + Path("<anchor>", os.path.relpath(full, anchor)).as_posix()
