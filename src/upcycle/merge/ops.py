"""Merge math as small pure functions on tensors (SPEC section 4). Randomness only through an
explicit generator or an explicit mask, never the global RNG.

Task vectors tau_i = theta_i - theta_base. Every method is one configuration of `merge`:
    1. sparsify each tau      none | dare (random drop, rescale) | magnitude (keep top density)
    2. weight each tau        w_i
    3. combine                sum | ties (elect a sign per entry, mean of the agreeing entries)
    4. theta = theta_base + scale * combined
Linear averaging (model soup) skips the base: theta = sum_i w_i theta_i / sum_i w_i.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch

SignMethod = Literal["total", "frequency"]
DareRescale = Literal["inverse", "l1"]


def dare_keep_mask(shape: Sequence[int], drop_p: float, gen: torch.Generator | None) -> torch.Tensor:
    """Bernoulli(1 - p) keep mask drawn from `gen` (a seeded torch.Generator)."""
    return torch.rand(tuple(shape), generator=gen) >= drop_p


def dare(tau: torch.Tensor, drop_p: float, gen: torch.Generator | None = None, keep: torch.Tensor | None = None,
         rescale: DareRescale = "inverse") -> torch.Tensor:
    """Drop And REscale: zero each entry with probability p; rescale the survivors.

    inverse: by 1/(1-p), so the expectation equals tau (the DARE paper);
    l1: so the L1 norm equals tau's (mergekit's option), exact per tensor rather than in expectation.
    """
    if not 0 <= drop_p < 1:
        raise ValueError(f"drop probability p={drop_p} must be in [0, 1)")
    if drop_p == 0:
        return tau.clone()
    if keep is None:
        keep = dare_keep_mask(tau.shape, drop_p, gen)
    kept = tau * keep.to(tau.dtype)
    if rescale == "inverse":
        return kept / (1 - drop_p)
    norm = kept.abs().sum()
    return kept * (tau.abs().sum() / norm) if norm > 0 else kept


def magnitude_trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density * numel) largest-magnitude entries (TIES's trim step), zero the rest."""
    if density >= 1:
        return tau.clone()
    k = int(density * tau.numel())
    mask = torch.zeros(tau.numel(), dtype=tau.dtype)
    if k > 0:
        mask[torch.topk(tau.abs().reshape(-1), k=k).indices] = 1
    return tau * mask.reshape(tau.shape)


def elect_sign(stacked: torch.Tensor, method: SignMethod = "total") -> torch.Tensor:
    """TIES sign election over dim 0: +1/-1 per entry, by summed value (total) or by vote (frequency)."""
    score = stacked.sum(0) if method == "total" else stacked.sign().sum(0)
    return torch.where(score >= 0, 1.0, -1.0).to(stacked.dtype)


def disjoint_mean(weighted: torch.Tensor, agree: torch.Tensor) -> torch.Tensor:
    """Mean over dim 0 of the entries that agree with the elected sign (zero where none do)."""
    total = (weighted * agree).sum(0)
    return total / agree.sum(0).clamp(min=1)


def combine(taus: list[torch.Tensor], weights: Sequence[float], consensus: Literal["sum", "ties"],
            sign_method: SignMethod = "total") -> torch.Tensor:
    """Steps 2 and 3: weight the (already sparsified) task vectors and combine them."""
    stacked = torch.stack(taus)  # (M, ...)
    w = torch.tensor(list(weights), dtype=stacked.dtype).reshape(-1, *([1] * (stacked.dim() - 1)))
    if consensus == "sum":
        return (stacked * w).sum(0)
    agree = (stacked.sign() == elect_sign(stacked, sign_method)).to(stacked.dtype)
    return disjoint_mean(stacked * w, agree)


def linear_average(tensors: list[torch.Tensor], weights: Sequence[float], normalize: bool = True) -> torch.Tensor:
    stacked = torch.stack(tensors)
    w = torch.tensor(list(weights), dtype=stacked.dtype).reshape(-1, *([1] * (stacked.dim() - 1)))
    total = (stacked * w).sum(0)
    return total / sum(weights) if normalize else total


# ----------------------------------------------------------------- LoRA children (UpIT stage 2)
# A LoRA expert is its factors A (r, in) and B (out, r), its delta s * B @ A (s = lora_alpha / r).
# A child of parents j, k with weights alpha, beta = 1 - alpha, each factor DARE'd with its own mask:


def pad_rank(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r, in), B (out, r) zero-padded to `rank` (exact: the extra rank-1 terms are 0)."""
    r = a.shape[0]
    return (torch.cat([a, a.new_zeros(rank - r, a.shape[1])]), torch.cat([b, b.new_zeros(b.shape[0], rank - r)], 1))


def lora_child_factors(parents: Sequence[tuple[torch.Tensor, torch.Tensor, float]], alpha: float,
                       dropped: Sequence[tuple[torch.Tensor, torch.Tensor]], scaling: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's E_new = DARE(alpha E_j) + DARE(beta E_k) on the expert's own parameters:
    A = alpha DARE(A_j) + beta DARE(A_k), B likewise, at the larger parent rank. `parents` are
    (A, B, s) as stored, `dropped` their DARE'd (A, B); each parent's s is folded into its B
    relative to the child's `scaling`. The child's delta has cross terms B_j A_k: the crossover."""
    rank = max(a.shape[0] for a, _, _ in parents)
    weights = (alpha, 1 - alpha)
    child_a = child_b = None
    for (a, b, s), (da, db), w in zip(parents, dropped, weights):
        da, db = pad_rank(da, db * (s / scaling), rank)
        child_a = w * da if child_a is None else child_a + w * da
        child_b = w * db if child_b is None else child_b + w * db
    return child_a, child_b


def lora_child_concat(parents: Sequence[tuple[torch.Tensor, torch.Tensor, float]], alpha: float,
                      dropped: Sequence[tuple[torch.Tensor, torch.Tensor]], scaling: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact alternative: the parents' DARE'd factors side by side, rank r_j + r_k, so that
    scaling * B @ A = alpha s_j DARE(B_j) DARE(A_j) + beta s_k DARE(B_k) DARE(A_k), exactly."""
    weights = (alpha, 1 - alpha)
    a = torch.cat([da for da, _ in dropped])
    b = torch.cat([w * (s / scaling) * db for (_, _, s), (_, db), w in zip(parents, dropped, weights)], 1)
    return a, b
