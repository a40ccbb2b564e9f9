"""How routers and experts are measured on seed data: each sample's response perplexity under
each expert (all experts in one batched forward, or one expert alone as the reference), and the
share of a bucket's tokens the routers send to its owner.

It is its own module because `route` (UpIT stage 3) and `mix` (router_init: ppl) both score
experts and report owner shares this way. It runs the model forward only; no I/O.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from upcycle.devices import to_model_device
from upcycle.train.trainer import pad_batch

# Response tokens whose logits are made at once when scoring: chunk x vocab fp32 values (512 MB at
# a 128k vocabulary), whatever the number of samples, their length and the number of experts.
NLL_CHUNK_TOKENS = 1024


def response_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of each row's response tokens: (rows,), from full logits (the
    reference `response_nll_chunked` must match; it holds rows x length x vocab values)."""
    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
    nll = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                          ignore_index=-100, reduction="none").reshape(shift_labels.shape)
    count = (shift_labels != -100).sum(1).clamp_min(1)
    return nll.sum(1) / count


def response_nll_chunked(model, ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                         chunk_tokens: int | None = None) -> torch.Tensor:
    """`response_nll` of the model's logits without making them: the decoder's last hidden states,
    then the LM head on the response positions only, `chunk_tokens` (NLL_CHUNK_TOKENS) at a time, in fp32."""
    chunk_tokens = chunk_tokens or NLL_CHUNK_TOKENS
    hidden = model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, H)
    head = model.get_output_embeddings()
    shift_labels = labels[:, 1:]
    rows, cols = (shift_labels != -100).nonzero(as_tuple=True)
    targets = shift_labels[rows, cols]
    picked = hidden[:, :-1][rows, cols]  # (M, H): the positions that predict a response token
    nll = torch.empty(len(targets), dtype=torch.float32, device=hidden.device)
    for start in range(0, len(targets), chunk_tokens):
        end = start + chunk_tokens
        nll[start:end] = F.cross_entropy(head(picked[start:end]).float(), targets[start:end], reduction="none")
    total = torch.zeros(ids.shape[0], dtype=torch.float32, device=hidden.device).index_add_(0, rows, nll)
    return total / torch.bincount(rows, minlength=ids.shape[0]).clamp_min(1)


@torch.no_grad()
def score_experts(model, samples, num_experts: int, batch_size: int, pad_id: int, progress: bool = False) -> torch.Tensor:
    """(samples, experts) perplexities (a CPU tensor): every expert in one forward per batch (rows
    replicated per expert), the NLL in chunks (`response_nll_chunked`). Under torchrun every rank
    calls it and scores its share of the batches (the same batches as one process: same numbers)."""
    from upcycle import distributed as dist
    from upcycle.moe.model import force_experts

    model.eval()
    bar = tqdm(total=len(dist.shard(range(0, len(samples), batch_size))), desc="scoring", mininterval=0.5,
               disable=not progress)

    def score(start: int) -> torch.Tensor:
        ids, labels, mask = to_model_device(pad_batch(samples[start:start + batch_size], pad_id), model)
        b = ids.shape[0]
        experts = torch.arange(num_experts, device=ids.device).repeat_interleave(b)  # (N*b,): copy e -> expert e
        with force_experts(model, experts):
            nll = response_nll_chunked(model, ids.repeat(num_experts, 1), labels.repeat(num_experts, 1),
                                       mask.repeat(num_experts, 1))
        bar.update()
        return nll.reshape(num_experts, b).T.cpu()

    out = dist.map_sharded(score, range(0, len(samples), batch_size))
    bar.close()
    return torch.cat(out).exp()


@torch.no_grad()
def score_one_expert(model, samples, expert: int, batch_size: int, pad_id: int) -> torch.Tensor:
    """(samples,) perplexities under one expert alone: the reference the batched scoring must match."""
    from upcycle.moe.model import force_experts

    model.eval()
    out = []
    for i in range(0, len(samples), batch_size):
        ids, labels, mask = to_model_device(pad_batch(samples[i:i + batch_size], pad_id), model)
        with force_experts(model, torch.full((ids.shape[0],), expert)):
            out.append(response_nll(model(input_ids=ids, attention_mask=mask).logits, labels).cpu())
    return torch.cat(out).exp()



@torch.no_grad()
def owner_share(model, samples, owners: torch.Tensor, top_k: int, pad_id: int, batch_size: int = 16) -> dict:
    """Per layer: the share of bucket tokens whose top-k (and top-1) experts include their owner.
    Under torchrun every rank calls it and counts its share of the batches."""
    from upcycle import distributed as dist
    from upcycle.moe.model import router_logits

    model.eval()

    def count(start: int) -> tuple[list[int], list[int], int]:
        ids, _, mask = to_model_device(pad_batch(samples[start:start + batch_size], pad_id), model)
        model(input_ids=ids, attention_mask=mask)
        owner_tok = owners[start:start + batch_size].to(ids.device).repeat_interleave(ids.shape[1])
        keep = mask.reshape(-1).bool()
        layer_k, layer_1 = [], []
        for logits in router_logits(model):
            top = torch.topk(logits, top_k, dim=-1).indices
            layer_k.append(((top == owner_tok[:, None]).any(-1) & keep).sum().item())
            layer_1.append(((top[:, 0] == owner_tok) & keep).sum().item())
        return layer_k, layer_1, keep.sum().item()

    counts = dist.map_sharded(count, range(0, len(samples), batch_size))
    hits_k = [sum(col) for col in zip(*(c[0] for c in counts))]
    hits_1 = [sum(col) for col in zip(*(c[1] for c in counts))]
    total = sum(c[2] for c in counts)
    return {"top_k": [h / total for h in hits_k], "top_1": [h / total for h in hits_1], "tokens": total}

