"""Router auxiliary losses: Switch load balancing and ST-MoE z-loss.

Load balancing (Switch Transformer): loss = N * sum_i f_i * P_i, with f_i the fraction of tokens
that have expert i among their top-k (so sum_i f_i = k) and P_i the mean router probability of i.
A perfectly uniform router scores k; a collapsed one scores up to N*k.

Scope "global" pools the tokens of every layer before computing f and P; it is exactly
transformers' `load_balancing_loss_func` (Mixtral, Qwen2-MoE). Scope "per_layer" computes the loss
per layer and averages: the paper's definition, insensitive to how layers disagree.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch


def _token_mask(attention_mask: torch.Tensor | None, rows: int, device) -> torch.Tensor:
    if attention_mask is None:
        return torch.ones(rows, device=device, dtype=torch.float32)
    mask = attention_mask.reshape(-1).to(device=device, dtype=torch.float32)
    if mask.numel() != rows:
        raise ValueError(f"attention_mask has {mask.numel()} tokens but the router saw {rows}")
    return mask


def _balance_sums(logits: torch.Tensor, top_k: int, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert (top-k assignment count, probability sum) over the unmasked tokens of one layer."""
    probs = torch.softmax(logits.float(), dim=-1)  # (T, N)
    _, chosen = torch.topk(probs, top_k, dim=-1)  # (T, k)
    counts = torch.zeros(logits.shape[-1], device=logits.device, dtype=torch.float32)
    counts = counts.scatter_add(0, chosen.reshape(-1), mask.repeat_interleave(top_k))
    prob_sum = (probs * mask.unsqueeze(-1)).sum(dim=0)
    return counts, prob_sum


def load_balancing_loss(
    router_logits: Sequence[torch.Tensor],
    top_k: int,
    scope: Literal["per_layer", "global"] = "per_layer",
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """router_logits: one (T, N) tensor per MoE layer. Padding tokens (mask 0) are left out."""
    if not router_logits:
        raise ValueError("no router logits: the model has no MoE layer or ran no forward pass")
    num_experts = router_logits[0].shape[-1]
    mask = _token_mask(attention_mask, router_logits[0].shape[0], router_logits[0].device)
    tokens = mask.sum().clamp_min(1.0)
    sums = [_balance_sums(logits, top_k, mask) for logits in router_logits]
    if scope == "global":
        counts = torch.stack([c for c, _ in sums]).sum(0)
        prob_sum = torch.stack([p for _, p in sums]).sum(0)
        layers = len(sums)
        return num_experts * torch.sum((counts / (tokens * layers)) * (prob_sum / (tokens * layers)))
    per_layer = [num_experts * torch.sum((c / tokens) * (p / tokens)) for c, p in sums]
    return torch.stack(per_layer).mean()


def router_z_loss(router_logits: Sequence[torch.Tensor], attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE z-loss: mean over tokens of logsumexp(logits)^2, averaged over layers."""
    mask = _token_mask(attention_mask, router_logits[0].shape[0], router_logits[0].device)
    per_layer = [(torch.logsumexp(l.float(), dim=-1).square() * mask).sum() / mask.sum().clamp_min(1.0)
                 for l in router_logits]
    return torch.stack(per_layer).mean()


def expert_load(router_logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Fraction of top-k assignments each expert receives in one layer: (N,), sums to 1."""
    _, chosen = torch.topk(router_logits.float(), top_k, dim=-1)
    counts = torch.bincount(chosen.reshape(-1), minlength=router_logits.shape[-1]).float()
    return counts / counts.sum()
