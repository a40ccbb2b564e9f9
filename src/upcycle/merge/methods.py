"""Merge methods as configured instances of one core (TIES and DARE are rows, not classes).

    merge_tensor(method, base, tensors, params, generators) -> merged tensor

`generators[i]` draws model i's DARE mask; callers derive it from the run seed and the tensor's
name, so a merge is reproducible and independent of tensor order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch

from upcycle.merge import ops


@dataclass(frozen=True)
class MergeMethod:
    name: str
    sparsify: Literal["none", "dare", "magnitude"]
    consensus: Literal["sum", "ties"]
    uses_base: bool = True
    summary: str = ""


METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in [
        MergeMethod("linear", "none", "sum", uses_base=False, summary="weighted average of the models (model soup)"),
        MergeMethod("task_arithmetic", "none", "sum", summary="base + scale * sum_i w_i tau_i"),
        MergeMethod("ties", "magnitude", "ties", summary="trim to density, elect signs, disjoint mean"),
        MergeMethod("dare", "dare", "sum", summary="DARE each tau, then task arithmetic (dare_linear)"),
        MergeMethod("dare_ties", "dare", "ties", summary="DARE each tau, then TIES sign election"),
    ]
}


@dataclass(frozen=True)
class MergeParams:
    weights: tuple[float, ...]
    scale: float = 1.0          # lambda
    density: float = 0.5        # ties: fraction kept by magnitude
    drop_p: float = 0.5         # dare, dare_ties: drop probability (MergeConfig sets it to 1 - density)
    dare_rescale: ops.DareRescale = "inverse"
    sign_method: ops.SignMethod = "total"
    normalize: bool = True      # linear: divide by the sum of weights


def sparsify(method: MergeMethod, tau: torch.Tensor, params: MergeParams, gen: torch.Generator | None,
             keep: torch.Tensor | None = None) -> torch.Tensor:
    if method.sparsify == "dare":
        return ops.dare(tau, params.drop_p, gen, keep=keep, rescale=params.dare_rescale)
    if method.sparsify == "magnitude":
        return ops.magnitude_trim(tau, params.density)
    return tau


def merge_tensor(method: MergeMethod, base: torch.Tensor | None, tensors: Sequence[torch.Tensor], params: MergeParams,
                 generators: Sequence[torch.Generator | None] | None = None,
                 keep_masks: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """One merged tensor, computed in fp32 and returned in the base's (or first model's) dtype."""
    dtype = (base if base is not None else tensors[0]).dtype
    if len(params.weights) != len(tensors):
        raise ValueError(f"{len(params.weights)} weights for {len(tensors)} models")
    if not method.uses_base:
        return ops.linear_average([t.float() for t in tensors], params.weights, params.normalize).to(dtype)
    if base is None:
        raise ValueError(f"merge method {method.name} needs a base model")
    base32 = base.float()
    # 1. task vectors, sparsified
    taus = []
    for i, t in enumerate(tensors):
        gen = generators[i] if generators is not None else None
        keep = keep_masks[i] if keep_masks is not None else None
        taus.append(sparsify(method, t.float() - base32, params, gen, keep))
    # 2-3. weight and combine
    combined = ops.combine(taus, params.weights, method.consensus, params.sign_method)
    # 4. back onto the base
    return (base32 + params.scale * combined).to(dtype)
