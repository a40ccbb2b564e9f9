"""Expert banks: full or fine-grained MLP experts, and LoRA experts on one shared frozen dense MLP.

Both take tokens with their top-k (indices, weights) and return the weighted sum of the chosen
experts' outputs. Weights are stacked per bank ((E, I_e, H) and so on) like transformers' own MoE
classes; each expert is computed only on the tokens routed to it, by one of two implementations:

    eager    a Python loop over the experts that received tokens (one host sync per layer to list
             them). The exact reference; its gradients go through `W[e]`, one full-size buffer per
             expert and projection.
    grouped  the T*k (token, expert) assignments sorted by expert once per layer, then one grouped
             GEMM per projection over all experts (`torch.nn.functional.grouped_mm`, the kernel
             transformers' `grouped_mm` experts implementation uses), no host sync. Where torch has
             no grouped kernel for the device/dtype/shape, a segmented loop over the sorted rows
             (one host sync per layer) stands in.
    auto     grouped (the default).

Choose per model with `set_experts_implementation(model, name)`, per block with
`MoEBlock(..., experts_implementation=name)`, or for a whole process with the environment variable
UPCYCLE_EXPERTS_IMPLEMENTATION (how the test suite runs every parity test under each one).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from upcycle.config import LoRAExpertSpec
from upcycle.errors import UpcycleError
from upcycle.moe.init import MLPWeights

PROJS = ("gate_proj", "up_proj", "down_proj")

ExpertsImplementation = Literal["auto", "eager", "grouped"]
IMPLEMENTATION_ENV = "UPCYCLE_EXPERTS_IMPLEMENTATION"


def activation(name: str) -> nn.Module:
    """The model's activation by its config name (imported here: transformers.activations takes ~1 s)."""
    from transformers.activations import ACT2FN

    return ACT2FN[name]


def check_implementation(name: str, where: str = "experts_implementation") -> ExpertsImplementation:
    if name not in get_args(ExpertsImplementation):
        raise UpcycleError(f"{where}={name!r} is not an experts implementation; use one of "
                           f"{', '.join(get_args(ExpertsImplementation))}")
    return name  # type: ignore[return-value]


def default_implementation() -> ExpertsImplementation:
    """The process-wide default: $UPCYCLE_EXPERTS_IMPLEMENTATION, else auto."""
    return check_implementation(os.environ.get(IMPLEMENTATION_ENV, "auto"), IMPLEMENTATION_ENV)


def set_experts_implementation(module: nn.Module, name: str) -> nn.Module:
    """Switch every expert bank inside `module` (a model or one block) to implementation `name`."""
    name = check_implementation(name)
    for m in module.modules():
        if isinstance(m, ExpertBank):
            m.implementation = name
    return module


# ----------------------------------------------------------------- eager dispatch (the reference)


def _dispatch(indices: torch.Tensor, num_experts: int):
    """Yield (expert, token rows, top-k slots) for every expert that received a token."""
    with torch.no_grad():
        hit = torch.bincount(indices.reshape(-1), minlength=num_experts).nonzero().flatten().tolist()
    for e in hit:
        token_idx, slot = torch.where(indices == e)
        yield e, token_idx, slot


# ----------------------------------------------------------------- grouped dispatch


def _grouped_mm_kernel_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether torch's grouped GEMM runs on x (S, in) and weight (E, out, in): it needs a kernel for
    the device (CPU since torch 2.10; CUDA from SM80, fastest in bf16) and rows of a multiple of 16 bytes."""
    if not hasattr(F, "grouped_mm") or x.dtype != weight.dtype:
        return False
    if x.device.type == "cuda":
        if torch.cuda.get_device_capability(x.device) < (8, 0):
            return False
    elif x.device.type != "cpu":
        return False
    row_bytes = (n * x.element_size() for n in weight.shape[1:])
    return all(b % 16 == 0 for b in row_bytes) and x.data_ptr() % 16 == 0 and weight.data_ptr() % 16 == 0


@dataclass
class SortedAssignments:
    """The T*k (token, expert) assignments of one layer, sorted by expert.

    Row i of every sorted tensor is assignment `order[i]` (flattened (T, k) position), i.e. token
    `order[i] // k`; the rows of expert e end at `offsets[e]`.
    """

    order: torch.Tensor    # (S,) int64
    offsets: torch.Tensor  # (E,) int32, cumulative row counts
    num_tokens: int
    top_k: int

    @classmethod
    def of(cls, indices: torch.Tensor, num_experts: int) -> "SortedAssignments":
        """indices: (T, k) expert ids -> the sorted assignments (no host sync)."""
        expert_sorted, order = torch.sort(indices.reshape(-1), stable=True)
        bounds = torch.arange(1, num_experts + 1, device=indices.device, dtype=expert_sorted.dtype)
        offsets = torch.searchsorted(expert_sorted, bounds, out_int32=True)
        return cls(order, offsets, indices.shape[0], indices.shape[1])

    @cached_property
    def token(self) -> torch.Tensor:  # (S,)
        return self.order // self.top_k

    @cached_property
    def sizes(self) -> list[int]:
        """Rows per expert, on the host: only the segmented fallback asks (one sync per layer)."""
        return torch.diff(self.offsets, prepend=self.offsets.new_zeros(1)).tolist()

    def weights(self, weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(T, k) routing weights -> (S, 1) in sorted order."""
        return weights.reshape(-1)[self.order].to(dtype).unsqueeze(-1)

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x: (S, in) sorted rows; weight: (E, out, in) -> (S, out), row i through its expert's weight."""
        x = x.to(weight.dtype).contiguous()
        if _grouped_mm_kernel_fits(x, weight):
            return F.grouped_mm(x, weight.transpose(-2, -1), offs=self.offsets)
        # Segmented fallback: unbind's backward stacks the per-expert grads into one (E, out, in) tensor.
        parts = [F.linear(xe, we) for xe, we in zip(x.split(self.sizes), weight.unbind(0))]
        return torch.cat(parts) if parts else x.new_zeros(0, weight.shape[1])

    def sum_by_token(self, y: torch.Tensor) -> torch.Tensor:
        """(S, D) sorted rows -> (T, D): each token's k rows summed, in slot order (deterministic)."""
        unsorted = y.new_empty(y.shape).index_copy_(0, self.order, y)  # (T*k, D), (token, slot) order
        return unsorted.view(self.num_tokens, self.top_k, y.shape[-1]).sum(dim=1)


class ExpertBank(nn.Module):
    """What MLP and LoRA experts share: the choice between the eager and the grouped forward."""

    num_experts: int

    def __init__(self, implementation: str | None = None):
        super().__init__()
        self.implementation = check_implementation(implementation) if implementation else default_implementation()

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x: (T, H); indices, weights: (T, k) -> (T, H)."""
        if self.implementation == "eager":
            return self.forward_eager(x, indices, weights)
        return self.forward_grouped(x, SortedAssignments.of(indices, self.num_experts), weights)

    def extra_repr(self) -> str:
        return f"implementation={self.implementation}"


class MLPExperts(ExpertBank):
    """N independent SwiGLU experts of width I_e (I_e = I / G for fine-grained experts)."""

    def __init__(self, num_experts: int, hidden_size: int, expert_width: int, hidden_act: str,
                 implementation: str | None = None):
        super().__init__(implementation)
        self.num_experts = num_experts
        self.gate_proj = nn.Parameter(torch.empty(num_experts, expert_width, hidden_size))  # (E, I_e, H)
        self.up_proj = nn.Parameter(torch.empty(num_experts, expert_width, hidden_size))  # (E, I_e, H)
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, expert_width))  # (E, H, I_e)
        self.act_fn = activation(hidden_act)

    def forward_eager(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for e, rows, slot in _dispatch(indices, self.num_experts):
            h = x[rows]  # (t, H)
            h = self.act_fn(F.linear(h, self.gate_proj[e])) * F.linear(h, self.up_proj[e])  # (t, I_e)
            h = F.linear(h, self.down_proj[e])  # (t, H)
            out.index_add_(0, rows, (h * weights[rows, slot, None].to(h.dtype)).to(out.dtype))
        return out

    def forward_grouped(self, x: torch.Tensor, sa: SortedAssignments, weights: torch.Tensor) -> torch.Tensor:
        xs = x[sa.token]  # (S, H), rows grouped by expert
        # gate and up are kept as two parameters (the state_dict every reader knows), so they are two
        # grouped GEMMs over the same rows: the FLOPs of one fused (E, 2*I_e, H) GEMM, without copying
        # the weights into a fused tensor on every forward.
        h = self.act_fn(sa.linear(xs, self.gate_proj)) * sa.linear(xs, self.up_proj)  # (S, I_e)
        y = sa.linear(h, self.down_proj) * sa.weights(weights, h.dtype)  # (S, H)
        return sa.sum_by_token(y).to(x.dtype)

    def expert(self, e: int) -> MLPWeights:
        return MLPWeights(self.gate_proj[e], self.up_proj[e], self.down_proj[e])

    def set_expert(self, e: int, w: MLPWeights) -> None:
        with torch.no_grad():
            self.gate_proj[e].copy_(w.gate)
            self.up_proj[e].copy_(w.up)
            self.down_proj[e].copy_(w.down)


class LoRAExperts(ExpertBank):
    """Expert e = the frozen dense MLP with W_p + (alpha/r) * B_p[e] @ A_p[e] on each target projection p.

    The dense projections are computed once per token for all experts: gate and up on the input,
    and (grouped path) down on the routing-weighted sum of the experts' inner activations, which
    equals the weighted sum of their down projections since down is linear. Each expert only adds
    its low-rank deltas on its own tokens (LoRAMoE-style), so N experts cost little more than one MLP.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, hidden_act: str,
                 lora: LoRAExpertSpec, implementation: str | None = None):
        super().__init__(implementation)
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

    def forward_eager(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        gate_all = F.linear(x, self.gate_proj)  # (T, I), shared by every expert
        up_all = F.linear(x, self.up_proj)  # (T, I)
        for e, rows, slot in _dispatch(indices, self.num_experts):
            h = x[rows]
            inner = self.act_fn(gate_all[rows] + self._delta("gate_proj", e, h)) * (up_all[rows] + self._delta("up_proj", e, h))
            y = F.linear(inner, self.down_proj) + self._delta("down_proj", e, inner)  # (t, H)
            out.index_add_(0, rows, (y * weights[rows, slot, None].to(y.dtype)).to(out.dtype))
        return out

    def _grouped_delta(self, proj: str, sa: SortedAssignments, h: torch.Tensor) -> torch.Tensor | int:
        """(S, in) sorted rows -> (S, out): each row's expert's (alpha/r) * B @ A, two grouped GEMMs."""
        if proj not in self.targets:
            return 0
        low = sa.linear(self.dropout(h), self.lora_A[proj])  # (S, r)
        return sa.linear(low, self.lora_B[proj]) * self.scaling

    def forward_grouped(self, x: torch.Tensor, sa: SortedAssignments, weights: torch.Tensor) -> torch.Tensor:
        gate_all = F.linear(x, self.gate_proj)  # (T, I), shared by every expert
        up_all = F.linear(x, self.up_proj)  # (T, I)
        xs = x[sa.token]  # (S, H)
        gate = gate_all[sa.token] + self._grouped_delta("gate_proj", sa, xs)  # (S, I)
        up = up_all[sa.token] + self._grouped_delta("up_proj", sa, xs)
        inner = self.act_fn(gate) * up  # (S, I)
        w = sa.weights(weights, inner.dtype)  # (S, 1)
        out = F.linear(sa.sum_by_token(inner * w), self.down_proj)  # (T, H): sum_k w_k inner_k @ W_down^T
        if "down_proj" in self.targets:
            out = out + sa.sum_by_token(self._grouped_delta("down_proj", sa, inner) * w)
        return out.to(x.dtype)

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
