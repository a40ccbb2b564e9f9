"""The router pre-training loss of UpIT stage 3: the LM loss plus each MoE layer's BCE of its router
logits against the sample's bucket owner.

It is its own module because `route` and `mix` (router_init: ppl) both pre-train routers with it
through the Trainer (upcycle/train/trainer.py's `make_trainer_class`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def router_loss(model, inputs: dict, alpha: float, aux_target: str, num_experts: int) -> torch.Tensor:
    """alpha * L_lm + (1 - alpha) * mean over MoE layers of L_aux against the owner (config.AUX_TARGET_HELP:
    one_hot, positive_only or softmax), averaged over the sample's real tokens.
    `model` may be wrapped (DDP, FSDP): the router logits come from its output, not from its blocks."""
    owner = inputs.pop("owner")  # (B,)
    outputs = model(**inputs)
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    keep = mask.reshape(-1).float() if mask is not None else torch.ones(ids.numel(), device=ids.device)
    owner_tok = owner.to(ids.device).repeat_interleave(ids.shape[1])  # (T,)
    terms = []
    for logits in outputs.router_logits:  # (T, N) per layer
        logits = logits.float()
        if aux_target == "one_hot":
            target = F.one_hot(owner_tok, num_experts).float()
            per_token = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(-1)
        elif aux_target == "softmax":
            per_token = F.cross_entropy(logits, owner_tok, reduction="none")
        else:  # positive_only
            per_token = -F.logsigmoid(logits.gather(1, owner_tok[:, None]).squeeze(1))
        terms.append((per_token * keep).sum() / keep.sum().clamp_min(1))
    aux = torch.stack(terms).mean()
    return alpha * outputs.loss + (1 - alpha) * aux
