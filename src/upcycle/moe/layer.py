"""One MoE layer's tensors by role, from wherever they come: a fresh upcycle of a dense MLP, or a live block.

A role is a tuple naming a tensor independently of any file format (see architectures.py):
("router",), ("expert", e, proj), ("shared", proj), ("shared_gate",), and for LoRA experts
("lora_base", proj), ("lora_A", proj), ("lora_B", proj). Writers ask a layer for roles in the
order they write them; experts are made one at a time, so memory stays at one expert.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from upcycle.config import InitSpec, MoESpec
from upcycle.moe import init as moe_init
from upcycle.moe.init import MLPWeights
from upcycle.seeding import generator

Role = tuple


@dataclass(frozen=True)
class LayerDims:
    hidden: int        # H
    intermediate: int  # I, the dense MLP's width
    spec: MoESpec

    @property
    def expert_width(self) -> int:  # I_e
        return self.intermediate // self.spec.granularity

    @property
    def shared_width(self) -> int:  # I_s
        return self.spec.num_shared_experts * self.expert_width

    def shape(self, role: Role) -> tuple[int, ...]:
        kind, h, i, ie = role[0], self.hidden, self.intermediate, self.expert_width
        proj = role[-1]
        if kind == "router":
            return (self.spec.num_experts, h)
        if kind == "expert":
            return (h, ie) if proj == "down_proj" else (ie, h)
        if kind == "shared":
            return (h, self.shared_width) if proj == "down_proj" else (self.shared_width, h)
        if kind == "shared_gate":
            return (1, h)
        if kind == "lora_base":
            return (h, i) if proj == "down_proj" else (i, h)
        r, n = self.spec.lora.rank, self.spec.num_experts
        fan_in, fan_out = (i, h) if proj == "down_proj" else (h, i)
        if kind == "lora_A":
            return (n, r, fan_in)
        if kind == "lora_B":
            return (n, fan_out, r)
        raise KeyError(f"unknown tensor role {role}")


class UpcycledLayer:
    """Layer `layer` of a fresh upcycle: every tensor derived from the dense MLP and the seed."""

    def __init__(self, dense: MLPWeights, layer: int, spec: MoESpec, init: InitSpec, seed: int):
        self.dense, self.layer, self.spec, self.init, self.seed = dense, layer, spec, init, seed
        self._expert_cache: tuple[int, MLPWeights] | None = None

    def expert(self, e: int) -> MLPWeights:
        if self._expert_cache is None or self._expert_cache[0] != e:
            self._expert_cache = (e, moe_init.init_expert(self.dense, e, self.layer, self.spec, self.init, self.seed))
        return self._expert_cache[1]

    def get(self, role: Role) -> torch.Tensor:
        kind, spec = role[0], self.spec
        if kind == "router":
            g = generator(self.seed, "layer", self.layer, "router")
            return moe_init.init_router(spec.num_experts, self.dense.gate.shape[1], spec.granularity, spec.router_init_std, g)
        if kind == "expert":
            return self.expert(role[1]).as_dict()[role[2]]
        if kind == "shared":
            return moe_init.init_shared_expert(self.dense, spec).as_dict()[role[1]]
        if kind == "shared_gate":
            # Zero gate: sigmoid(0) = 1/2 on every token at init; trained afterwards.
            return torch.zeros(1, self.dense.gate.shape[1])
        if kind == "lora_base":
            return self.dense.as_dict()[role[1]]
        proj = role[1]
        fan_in = self.dense.down.shape[1] if proj == "down_proj" else self.dense.gate.shape[1]
        if kind == "lora_A":
            return moe_init.init_lora_a(spec.num_experts, spec.lora.rank, fan_in, generator(self.seed, "layer", self.layer, "lora_A", proj))
        if kind == "lora_B":
            fan_out = self.dense.down.shape[0] if proj == "down_proj" else self.dense.gate.shape[0]
            return torch.zeros(spec.num_experts, fan_out, spec.lora.rank)
        raise KeyError(f"unknown tensor role {role}")
