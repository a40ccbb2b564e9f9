"""Plan first, then stream: the list of output tensors (name, shape, dtype, where each comes from).

The plan is made from shapes alone, before any weight is read, so shards can be laid out and
their headers written up front. Tensors are ordered layer by layer: while layer l is written
only layer l's dense MLP and one expert at a time are in memory.

A part is a role with its layer: ("tensor", name) is a dense tensor copied through unchanged;
("moe", layer, *role) is an MoE tensor (see moe/layer.py). A planned tensor made of several
parts is their concatenation along dim 0 (a stacked expert bank written expert by expert).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm

from upcycle.architectures import OWN_FORMAT, MoEFormat
from upcycle.io.safetensors_io import PlannedTensor, ShardedWriter
from upcycle.moe.block import MoEBlock
from upcycle.moe.layer import LayerDims

LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class PlanEntry:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    parts: tuple[tuple, ...]

    def planned(self) -> PlannedTensor:
        return PlannedTensor(self.name, self.shape, self.dtype)


def layer_of(name: str) -> int | None:
    m = LAYER_RE.match(name)
    return int(m.group(1)) if m else None


def _ordered(names: list[str]) -> list[str]:
    """Embeddings first, then layer by layer, then the final norm and head (stable within groups)."""
    def key(n: str):
        layer = layer_of(n)
        if layer is not None:
            return (1, layer)
        return (0, 0) if "embed" in n else (2, 0)
    return sorted(names, key=key)


def own_layer_entries(layer: int, dims: LayerDims, hidden_act: str) -> list[tuple[str, tuple[int, ...], list[tuple]]]:
    """The toolkit's own format: an MoE layer saved under its MoEBlock state_dict names."""
    with torch.device("meta"):
        block = MoEBlock(dims.spec, dims.hidden, dims.intermediate, hidden_act)
    shapes = {k: tuple(v.shape) for k, v in block.state_dict().items()}
    prefix = f"model.layers.{layer}.mlp."
    return [(prefix + key, shapes[key], roles) for key, roles in block.state_roles().items()]


def build_plan(
    target: MoEFormat | str,
    passthrough: dict[str, tuple[tuple[int, ...], torch.dtype]],
    moe_layers: list[int],
    dims: LayerDims,
    hidden_act: str,
    moe_dtype: torch.dtype,
    out_dtype: torch.dtype | None,
    compact: bool = False,
) -> list[PlanEntry]:
    """All output tensors in write order.

    passthrough: dense tensors copied unchanged (attention, norms, embeddings, dense-layer MLPs).
    target: a native MoEFormat, or "upcycle" for the own format (compact: MoE tensors only,
    without the base weights, for LoRA experts loaded back onto their base).
    """
    def cast(dtype: torch.dtype) -> torch.dtype:
        return out_dtype if (out_dtype is not None and dtype.is_floating_point) else dtype

    by_layer: dict[int | None, list[PlanEntry]] = {}
    if not compact:
        for name in _ordered(list(passthrough)):
            shape, dtype = passthrough[name]
            by_layer.setdefault(layer_of(name), []).append(PlanEntry(name, tuple(shape), cast(dtype), (("tensor", name),)))
    for layer in moe_layers:
        entries = by_layer.setdefault(layer, [])
        if target == OWN_FORMAT:
            for name, shape, roles in own_layer_entries(layer, dims, hidden_act):
                if compact and roles[0][0] == "lora_base":
                    continue
                entries.append(PlanEntry(name, shape, cast(moe_dtype), tuple(("moe", layer, *r) for r in roles)))
        else:
            for name, role in target.layer_entries(layer, dims.spec, dims.shared_width):
                entries.append(PlanEntry(name, dims.shape(role), cast(moe_dtype), (("moe", layer, *role),)))
    head = by_layer.pop(None, [])
    first = [e for e in head if "embed" in e.name]
    last = [e for e in head if "embed" not in e.name]
    plan = first + [e for layer in sorted(by_layer) for e in by_layer[layer]] + last
    return plan


def write_plan(plan: list[PlanEntry], folder, max_shard_bytes: int, provider: Callable[[tuple], torch.Tensor],
               progress: bool = True, desc: str = "writing") -> list[str]:
    """Stream every planned tensor from `provider(part)` into safetensors shards in `folder`."""
    writer = ShardedWriter(folder, [e.planned() for e in plan], max_shard_bytes)
    for entry in tqdm(plan, desc=desc, unit="tensor", disable=not progress, mininterval=0.5):
        for part in entry.parts:
            t = provider(part)
            # A part of a stacked tensor (one expert of a bank) has the bank's shape without dim 0.
            want = entry.shape if len(entry.parts) == 1 and t.dim() == len(entry.shape) else entry.shape[1:]
            if tuple(t.shape) != tuple(want):
                raise ValueError(f"{entry.name}: part {part} has shape {tuple(t.shape)}, planned {tuple(want)}")
            writer.write(entry.name, t)
    return writer.close()
