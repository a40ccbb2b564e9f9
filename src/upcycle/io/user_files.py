"""Small files a user hands the tool (configs, adapter and model configs, manifests): read with one
line of error naming the file and what is wrong, never a traceback, and never without bounds.

- `read_json_object`: a JSON object (not a list, not binary, not invalid JSON).
- `load_yaml`: a YAML document under a size limit, whose aliases may not expand it past a node
  limit (a "billion laughs" file is a few hundred bytes that expand to 10^9 nodes; PyYAML builds
  it lazily as shared references, and the first copy of it, by a merge or by pydantic, eats the
  machine) and may not refer to themselves.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from upcycle.errors import UpcycleError

MAX_YAML_BYTES = 1 << 20
"""A config is a few KB; a megabyte is far beyond any recipe and keeps a bad file cheap to refuse."""
MAX_YAML_NODES = 100_000
"""Nodes of the document with every alias expanded (each recipe has a few hundred)."""


def read_json_object(path: str | Path, what: str = "file", hint: str = "") -> dict:
    """The JSON object in `path`, or one UpcycleError line naming the file (`hint`: what to do)."""
    path = Path(path)
    fix = f"; {hint}" if hint else ""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise UpcycleError(f"{path}: {what} not found{fix}") from None
    except IsADirectoryError:
        raise UpcycleError(f"{path}: a folder, not a {what}{fix}") from None
    except UnicodeDecodeError:
        raise UpcycleError(f"{path}: not a {what} (binary, not UTF-8 text){fix}") from None
    except json.JSONDecodeError as e:
        raise UpcycleError(f"{path}: not a valid JSON {what} ({e.msg} at line {e.lineno}){fix}") from None
    except RecursionError:
        raise UpcycleError(f"{path}: not a {what} (JSON nested too deeply){fix}") from None
    if not isinstance(data, dict):
        raise UpcycleError(f"{path}: a JSON {type(data).__name__}, not an object (a {what} is a JSON object){fix}")
    return data


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that measures the composed document before building any Python object from it."""

    source = "config"

    def compose_document(self):
        node = super().compose_document()
        expanded_size(node, self.source)
        return node


def expanded_size(root: yaml.Node, source: str) -> int:
    """Nodes in the document with every alias expanded; refuses self-reference and too many nodes.

    Aliases are shared node objects, so memoizing by identity counts the expansion in time linear
    in the file, without expanding anything."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise UpcycleError(f"{source}: an alias refers to the node that contains it (a recursive "
                               "document); write the values out")
        open_nodes.add(key)
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        else:
            children = []
        total = 1
        for child in children:
            total += size(child)
            if total > MAX_YAML_NODES:
                raise UpcycleError(f"{source}: its aliases expand it past {MAX_YAML_NODES} values (a \"billion "
                                   "laughs\" file?); refused unread. Write the values out, or use fewer aliases")
        open_nodes.discard(key)
        sizes[key] = total
        return total

    return size(root)


def load_yaml(text: str | bytes, source: str) -> Any:
    """One YAML document within the size and expansion limits; errors name `source`."""
    if len(text) > MAX_YAML_BYTES:
        raise UpcycleError(f"{source}: {len(text)} bytes, over the {MAX_YAML_BYTES} a config may have; "
                           "is this the right file?")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise UpcycleError(f"{source}: not a YAML file (binary, not UTF-8 text)") from None
    loader = _BoundedLoader(text)
    loader.source = source
    try:
        return loader.get_single_data()
    except yaml.YAMLError as e:
        raise UpcycleError(f"{source}: not valid YAML ({str(e).splitlines()[0]})") from None
    except RecursionError:
        raise UpcycleError(f"{source}: not valid YAML (nested too deeply)") from None
    finally:
        loader.dispose()


def read_yaml_file(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise UpcycleError(f"{path}: config file not found")
    size = path.stat().st_size
    if size > MAX_YAML_BYTES:
        raise UpcycleError(f"{path}: {size} bytes, over the {MAX_YAML_BYTES} a config may have; is this the right file?")
    return load_yaml(path.read_bytes(), str(path))
