"""The MoE block that replaces a decoder layer's MLP: router -> experts (+ shared experts).

It takes and returns (B, S, H) like the MLP it replaces, so attention, norms, caching and
`generate()` are untouched. The router logits of the last forward are kept on the block
(`last_router_logits`) for the auxiliary losses and routing analysis, which live outside it.
"""

from __future__ import annotations

import torch
from torch import nn

from upcycle.config import MoESpec
from upcycle.moe.experts import PROJS, LoRAExperts, MLPExperts, SharedExperts
from upcycle.moe.init import MLPWeights
from upcycle.moe.layer import LayerDims, Role
from upcycle.moe.router import Router


class MoEBlock(nn.Module):
    def __init__(self, spec: MoESpec, hidden_size: int, intermediate_size: int, hidden_act: str,
                 experts_implementation: str | None = None):
        """experts_implementation: auto | eager | grouped (see moe/experts.py); None: the process default."""
        super().__init__()
        self.spec = spec
        self.dims = LayerDims(hidden_size, intermediate_size, spec)
        self.router = Router(hidden_size, spec.num_experts, spec.top_k, spec.routing, spec.router_jitter)
        if spec.expert_type == "lora":
            self.experts = LoRAExperts(spec.num_experts, hidden_size, intermediate_size, hidden_act, spec.lora,
                                       experts_implementation)
        else:
            self.experts = MLPExperts(spec.num_experts, hidden_size, self.dims.expert_width, hidden_act,
                                      experts_implementation)
        self.shared_experts = SharedExperts(hidden_size, self.dims.shared_width, hidden_act) if spec.num_shared_experts else None
        self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False) if spec.num_shared_experts and spec.shared_expert_gate else None
        self.last_router_logits: torch.Tensor | None = None
        # (B,) expert per sequence: bypass the router and send every token of row b to that expert
        # with weight 1 (scoring each expert alone in one batched forward; see moe.model.force_experts).
        self.forced_experts: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # (T, H)
        logits, weights, indices = self.router(x)  # (T, N), (T, k), (T, k)
        if self.forced_experts is not None:
            indices = self.forced_experts.to(x.device).repeat_interleave(shape[1]).unsqueeze(-1)  # (T, 1)
            weights = torch.ones_like(indices, dtype=weights.dtype)
        out = self.experts(x, indices, weights)
        if self.shared_experts is not None:
            shared = self.shared_experts(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        self.last_router_logits = logits
        return out.reshape(shape)

    # ------------------------------------------------------------ tensors by role

    def state_roles(self) -> dict[str, list[Role]]:
        """This block's state_dict keys -> the roles whose tensors, stacked on dim 0, make each one.

        The single source of truth for the toolkit's own format (see export/plan.py).
        """
        n = self.spec.num_experts
        roles: dict[str, list[Role]] = {"router.weight": [("router",)]}
        for proj in PROJS:
            if isinstance(self.experts, LoRAExperts):
                roles[f"experts.{proj}"] = [("lora_base", proj)]
            else:
                roles[f"experts.{proj}"] = [("expert", e, proj) for e in range(n)]
        if isinstance(self.experts, LoRAExperts):
            for proj in self.experts.targets:
                roles[f"experts.lora_A.{proj}"] = [("lora_A", proj)]
                roles[f"experts.lora_B.{proj}"] = [("lora_B", proj)]
        if self.shared_experts is not None:
            for proj in PROJS:
                roles[f"shared_experts.{proj}.weight"] = [("shared", proj)]
        if self.shared_expert_gate is not None:
            roles["shared_expert_gate.weight"] = [("shared_gate",)]
        return roles

    def get(self, role: Role) -> torch.Tensor:
        """The tensor of a role, from this block's current weights (LoRA experts materialized)."""
        kind = role[0]
        if kind == "router":
            return self.router.weight
        if kind == "expert":
            return self.experts.expert(role[1]).as_dict()[role[2]]
        if kind == "shared":
            if self.shared_experts is None:  # a format that always has one (Qwen2-MoE): width 0
                return torch.zeros(self.dims.shape(role))
            return self.shared_experts.weights().as_dict()[role[1]]
        if kind == "shared_gate":
            return self.shared_expert_gate.weight if self.shared_expert_gate is not None else torch.zeros(1, self.dims.hidden)
        if kind == "lora_base":
            return getattr(self.experts, role[1])
        if kind == "lora_A":
            return self.experts.lora_A[role[1]]
        if kind == "lora_B":
            return self.experts.lora_B[role[1]]
        raise KeyError(f"unknown tensor role {role}")

    @torch.no_grad()
    def fill_from(self, layer) -> "MoEBlock":
        """Copy every tensor of this block from a layer source (e.g. moe.layer.UpcycledLayer)."""
        state = self.state_dict()
        for key, parts in self.state_roles().items():
            tensors = [layer.get(r) for r in parts]
            value = torch.stack(tensors) if len(parts) > 1 or parts[0][0] == "expert" else tensors[0]
            state[key].copy_(value.reshape(state[key].shape))
        return self

    def extra_repr(self) -> str:
        s = self.spec
        return (f"experts={s.num_experts} ({s.expert_type}, width {self.dims.expert_width}), top_k={s.top_k}, "
                f"routing={s.routing}, shared={s.num_shared_experts}")


def dense_mlp_weights(mlp: nn.Module) -> MLPWeights:
    """The weights of a stock Llama/Mistral/Qwen MLP module."""
    return MLPWeights(mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach(), mlp.down_proj.weight.detach())
