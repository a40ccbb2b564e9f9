"""Routing analysis: which experts each domain's tokens go to, per layer (the paper's routing figure).

For every domain, the share of its tokens' top-k slots that each expert receives, at every MoE
layer, and one specialization number per domain: 1 - H(share) / log(N), averaged over layers
(0 = spread evenly over the experts, 1 = every token of the domain goes to the same expert).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from upcycle.data.encode import render


@torch.no_grad()
def routing_shares(model, tokenizer, texts_by_domain: dict[str, list[str]], batch_size: int = 16) -> dict[str, torch.Tensor]:
    """{domain: (layers, experts)} shares of top-k assignments (CPU tensors); each row sums to 1."""
    from upcycle.devices import to_model_device
    from upcycle.moe.model import router_logits

    model.eval()
    k = model.upcycle_spec.top_k
    out = {}
    for domain, texts in texts_by_domain.items():
        counts = None
        for i in range(0, len(texts), batch_size):
            enc = to_model_device(tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True,
                                            add_special_tokens=False), model)
            model(**enc)
            keep = enc["attention_mask"].reshape(-1).bool()
            layer_counts = []
            for logits in router_logits(model):
                chosen = torch.topk(logits[keep], k, dim=-1).indices.reshape(-1)
                layer_counts.append(torch.bincount(chosen, minlength=logits.shape[-1]).float())
            batch = torch.stack(layer_counts)
            counts = batch if counts is None else counts + batch
        out[domain] = (counts / counts.sum(-1, keepdim=True)).cpu()
    return out


def specialization(shares: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per domain: 1 - mean over layers of H(share) / log(N)."""
    out = {}
    for domain, s in shares.items():
        p = s.clamp_min(1e-12)
        entropy = -(s * p.log()).sum(-1) / math.log(s.shape[-1])
        out[domain] = float(1 - entropy.mean())
    return out


def suite_texts(tokenizer, items, per_domain: int = 20) -> dict[str, list[str]]:
    """Chat-rendered prompt + reference answer of the suite's test items, grouped by domain."""
    grouped: dict[str, list[str]] = {}
    for item in items:
        texts = grouped.setdefault(item.domain, [])
        if len(texts) < per_domain:
            texts.append(render(tokenizer, [{"role": "user", "content": item.prompt},
                                            {"role": "assistant", "content": item.answer}], add_generation_prompt=False))
    return grouped


def plot_routing(shares: dict[str, torch.Tensor], path: Path, title: str = "Routing by domain",
                 layers: list[int] | None = None) -> None:
    """Heatmaps domain x expert: the mean over layers, and a few single layers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = list(shares)
    n_layers = next(iter(shares.values())).shape[0]
    layers = layers if layers is not None else sorted({0, n_layers // 2, n_layers - 1})
    panels = [("mean over layers", torch.stack([shares[d].mean(0) for d in domains]))]
    panels += [(f"layer {l}", torch.stack([shares[d][l] for d in domains])) for l in layers]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels) + 1, 0.6 * len(domains) + 1.8), squeeze=False)
    vmax = max(p.max().item() for _, p in panels)
    for ax, (name, matrix) in zip(axes[0], panels):
        im = ax.imshow(matrix.numpy(), cmap="magma", vmin=0, vmax=vmax, aspect="auto")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("expert")
        ax.set_xticks(range(matrix.shape[1]))
        ax.set_yticks(range(len(domains)), domains if ax is axes[0][0] else [""] * len(domains))
    fig.colorbar(im, ax=axes[0].tolist(), label="share of the domain's top-k slots")
    fig.suptitle(title)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
