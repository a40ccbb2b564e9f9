"""Expert banks: full or fine-grained MLP experts, and LoRA experts on one shared frozen dense MLP.

Both take tokens with their top-k (indices, weights) and return the weighted sum of the chosen
experts' outputs. Weights are stacked per bank ((E, I_e, H) and so on) like transformers' own MoE
classes; each expert is computed only on the tokens routed to it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from upcycle.config import LoRAExpertSpec
from upcycle.moe.init import MLPWeights

PROJS = ("gate_proj", "up_proj", "down_proj")


def activation(name: str) -> nn.Module:
    """The model's activation by its config name (imported here: transformers.activations takes ~1 s)."""
    from transformers.activations import ACT2FN

    return ACT2FN[name]


def _dispatch(indices: torch.Tensor, num_experts: int):
    """Yield (expert, token rows, top-k slots) for every expert that received a token."""
    with torch.no_grad():
        hit = torch.bincount(indices.reshape(-1), minlength=num_experts).nonzero().flatten().tolist()
    for e in hit:
        token_idx, slot = torch.where(indices == e)
        yield e, token_idx, slot


class MLPExperts(nn.Module):
    """N independent SwiGLU experts of width I_e (I_e = I / G for fine-grained experts)."""

    def __init__(self, num_experts: int, hidden_size: int, expert_width: int, hidden_act: str):
        super().__init__()
        self.num_experts = num_experts
        self.gate_proj = nn.Parameter(torch.empty(num_experts, expert_width, hidden_size))  # (E, I_e, H)
        self.up_proj = nn.Parameter(torch.empty(num_experts, expert_width, hidden_size))  # (E, I_e, H)
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, expert_width))  # (E, H, I_e)
        self.act_fn = activation(hidden_act)

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x: (T, H); indices, weights: (T, k) -> (T, H)."""
        out = torch.zeros_like(x)
        for e, rows, slot in _dispatch(indices, self.num_experts):
            h = x[rows]  # (t, H)
            h = self.act_fn(F.linear(h, self.gate_proj[e])) * F.linear(h, self.up_proj[e])  # (t, I_e)
            h = F.linear(h, self.down_proj[e])  # (t, H)
            out.index_add_(0, rows, (h * weights[rows, slot, None].to(h.dtype)).to(out.dtype))
        return out

    def expert(self, e: int) -> MLPWeights:
        return MLPWeights(self.gate_proj[e], self.up_proj[e], self.down_proj[e])

    def set_expert(self, e: int, w: MLPWeights) -> None:
        with torch.no_grad():
            self.gate_proj[e].copy_(w.gate)
            self.up_proj[e].copy_(w.up)
            self.down_proj[e].copy_(w.down)


class LoRAExperts(nn.Module):
    """Expert e = the frozen dense MLP with W_p + (alpha/r) * B_p[e] @ A_p[e] on each target projection p.

    The dense projections of gate and up are computed once for all tokens; each expert only adds
    its low-rank deltas on its own tokens (LoRAMoE-style), so N experts cost far less than N MLPs.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, hidden_act: str, lora: LoRAExpertSpec):
        super().__init__()
        self.num_experts = num_experts
        self.scaling = lora.alpha / lora.rank
        self.targets = tuple(lora.targets)
        frozen = lambda *shape: nn.Parameter(torch.empty(*shape), requires_grad=False)  # noqa: E731
        self.gate_proj = frozen(intermediate_size, hidden_size)  # (I, H) shared dense weights
        self.up_proj = frozen(intermediate_size, hidden_size)
        self.down_proj = frozen(hidden_size, intermediate_size)
        in_out = {"gate_proj": (hidden_size, intermediate_size), "up_proj": (hidden_size, intermediate_size),
                  "down_proj": (intermediate_size, hidden_size)}
        self.lora_A = nn.ParameterDict(
            {p: nn.Parameter(torch.empty(num_experts, lora.rank, in_out[p][0])) for p in self.targets})  # (E, r, in)
        self.lora_B = nn.ParameterDict(
            {p: nn.Parameter(torch.empty(num_experts, in_out[p][1], lora.rank)) for p in self.targets})  # (E, out, r)
        self.dropout = nn.Dropout(lora.dropout) if lora.dropout > 0 else nn.Identity()
        self.act_fn = activation(hidden_act)

    def _delta(self, proj: str, e: int, h: torch.Tensor) -> torch.Tensor | int:
        if proj not in self.targets:
            return 0
        a, b = self.lora_A[proj][e], self.lora_B[proj][e]
        return F.linear(F.linear(self.dropout(h), a), b) * self.scaling

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        gate_all = F.linear(x, self.gate_proj)  # (T, I), shared by every expert
        up_all = F.linear(x, self.up_proj)  # (T, I)
        for e, rows, slot in _dispatch(indices, self.num_experts):
            h = x[rows]
            inner = self.act_fn(gate_all[rows] + self._delta("gate_proj", e, h)) * (up_all[rows] + self._delta("up_proj", e, h))
            y = F.linear(inner, self.down_proj) + self._delta("down_proj", e, inner)  # (t, H)
            out.index_add_(0, rows, (y * weights[rows, slot, None].to(y.dtype)).to(out.dtype))
        return out

    def delta_weight(self, proj: str, e: int) -> torch.Tensor | None:
        """dW = (alpha/r) * B @ A for one expert and projection, shaped like the dense weight."""
        if proj not in self.targets:
            return None
        return (self.lora_B[proj][e].float() @ self.lora_A[proj][e].float()) * self.scaling

    def expert(self, e: int) -> MLPWeights:
        """Expert e materialized: W + dW on each projection."""
        out = {}
        for proj in PROJS:
            w = getattr(self, proj)
            d = self.delta_weight(proj, e)
            out[proj] = w if d is None else (w.float() + d).to(w.dtype)
        return MLPWeights(out["gate_proj"], out["up_proj"], out["down_proj"])


class SharedExperts(nn.Module):
    """Always-on experts as one SwiGLU MLP (S experts of width I_e concatenated = one MLP of width S*I_e)."""

    def __init__(self, hidden_size: int, width: int, hidden_act: str):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, width, bias=False)
        self.up_proj = nn.Linear(hidden_size, width, bias=False)
        self.down_proj = nn.Linear(width, hidden_size, bias=False)
        self.act_fn = activation(hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    def weights(self) -> MLPWeights:
        return MLPWeights(self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)
