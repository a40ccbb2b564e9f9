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


def _stacked(router_logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """(L, T, N) fp32: every layer at once, so each step below is one kernel rather than one per layer."""
    if not router_logits:
        raise ValueError("no router logits: the model has no MoE layer or ran no forward pass")
    return torch.stack([l.float() for l in router_logits])


def load_balancing_loss(
    router_logits: Sequence[torch.Tensor],
    top_k: int,
    scope: Literal["per_layer", "global"] = "per_layer",
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """router_logits: one (T, N) tensor per MoE layer. Padding tokens (mask 0) are left out."""
    logits = _stacked(router_logits)  # (L, T, N)
    layers, rows, num_experts = logits.shape
    mask = _token_mask(attention_mask, rows, logits.device)  # (T,)
    tokens = mask.sum().clamp_min(1.0)
    probs = torch.softmax(logits, dim=-1)  # (L, T, N)
    chosen = torch.topk(probs, top_k, dim=-1).indices  # (L, T, k)
    # Per layer and expert: top-k assignment count and probability sum over the unmasked tokens.
    counts = torch.zeros(layers, num_experts, device=logits.device, dtype=torch.float32)
    counts = counts.scatter_add(1, chosen.reshape(layers, -1), mask.repeat_interleave(top_k).expand(layers, -1))
    prob_sum = (probs * mask[:, None]).sum(dim=1)  # (L, N)
    if scope == "global":
        total = tokens * layers
        return num_experts * torch.sum((counts.sum(0) / total) * (prob_sum.sum(0) / total))
    per_layer = num_experts * torch.sum((counts / tokens) * (prob_sum / tokens), dim=-1)  # (L,)
    return per_layer.mean()


def router_z_loss(router_logits: Sequence[torch.Tensor], attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE z-loss: mean over tokens of logsumexp(logits)^2, averaged over layers."""
    logits = _stacked(router_logits)  # (L, T, N)
    mask = _token_mask(attention_mask, logits.shape[1], logits.device)
    per_layer = (torch.logsumexp(logits, dim=-1).square() * mask).sum(dim=-1) / mask.sum().clamp_min(1.0)  # (L,)
    return per_layer.mean()


def expert_load(router_logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Fraction of top-k assignments each expert receives in one layer: (N,), sums to 1."""
    _, chosen = torch.topk(router_logits.float(), top_k, dim=-1)
    counts = torch.bincount(chosen.reshape(-1), minlength=router_logits.shape[-1]).float()
    return counts / counts.sum()
