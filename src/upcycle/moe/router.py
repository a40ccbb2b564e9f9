"""The router: token -> (top-k experts, their weights), with the three routing orders of SPEC section 2.

Router math runs in fp32 whatever the model dtype (logits, softmax, top-k); the weights are cast
back to the activations' dtype by the caller. The balancing losses live in `losses.py`, outside
the block, as in transformers' Mixtral.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from upcycle.config import Routing


def route(logits: torch.Tensor, top_k: int, routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick top-k experts per token.

    logits: (T, N) fp32. Returns weights (T, k) fp32 and indices (T, k) int64.
      softmax_topk:        weights = TopK(Softmax(logits))           (sum < 1; NVIDIA)
      softmax_topk_renorm: the same, divided by their sum
      topk_softmax:        weights = Softmax(TopK(logits))           (Mixtral; equals the renormalized form)
    """
    if routing == "topk_softmax":
        top_logits, indices = torch.topk(logits, top_k, dim=-1)  # (T, k)
        return torch.softmax(top_logits, dim=-1), indices
    probs = torch.softmax(logits, dim=-1)  # (T, N)
    weights, indices = torch.topk(probs, top_k, dim=-1)  # (T, k)
    if routing == "softmax_topk_renorm":
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, indices


class Router(nn.Module):
    """A linear gate W_r (N, H) without bias, as every stock MoE class has."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, routing: Routing, jitter: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.top_k = top_k
        self.routing = routing
        self.jitter = jitter

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (T, H) -> logits (T, N) fp32, weights (T, k) fp32, indices (T, k)."""
        x = x.float()
        if self.training and self.jitter > 0:
            # Switch Transformer's multiplicative jitter, on the router input only (not the experts').
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x, self.weight.float())  # (T, N) fp32 even under the Trainer's bf16 autocast
        weights, indices = route(logits, self.top_k, self.routing)
        return logits, weights, indices

    def extra_repr(self) -> str:
        n, h = self.weight.shape
        return f"hidden={h}, experts={n}, top_k={self.top_k}, routing={self.routing}"
