"""The plots the stages draw beside their outputs (matplotlib, Agg, written as PNG files):

    plot_similarity    expand: the pool's pairwise task-vector similarity, checkpoints and children
    plot_buckets       route: per-sample log perplexity across experts, and each bucket's domains
    plot_owner_share   route: bucket tokens routed to their owner per layer, before and after
    plot_loss          every training stage: train and eval loss over optimizer steps

(per-checkpoint scores: eval/checkpoints.py; routing by domain: eval/routing.py)
"""

from __future__ import annotations

from pathlib import Path

import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_similarity(sim: torch.Tensor, records: list[dict], metric: str, path: Path) -> None:
    plt = _pyplot()
    values = sim.numpy() if metric == "cosine" else -sim.numpy()
    labels = [f"ck{r['checkpoint']}" if r["origin"] == "checkpoint" else f"child{r['index']}" for r in records]
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(labels), 1 + 0.55 * len(labels)))
    im = ax.imshow(values, cmap="viridis")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if values[i, j] < values.mean() else "black")
    fig.colorbar(im, ax=ax, label="cosine similarity of task vectors" if metric == "cosine" else "L2 distance")
    ax.set_title("Expert pool after expansion")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_buckets(ppl: torch.Tensor, owners: torch.Tensor, domains: list, path: Path) -> None:
    plt = _pyplot()
    order = torch.argsort(owners, stable=True)
    rel = ppl.log() - ppl.log().mean(1, keepdim=True)  # per sample: which experts are better than its average
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.5), gridspec_kw={"width_ratios": [1.2, 1]})
    im = a.imshow(rel[order].numpy(), aspect="auto", cmap="coolwarm")
    a.set_xlabel("expert")
    a.set_ylabel("seed sample (grouped by owner)")
    a.set_title("log perplexity minus the sample's mean")
    fig.colorbar(im, ax=a)
    n = ppl.shape[1]
    names = sorted({str(d) for d in domains})
    bottom = [0] * n
    for name in names:
        counts = [sum(1 for d, o in zip(domains, owners.tolist()) if str(d) == name and o == e) for e in range(n)]
        b.bar(range(n), counts, bottom=bottom, label=name)
        bottom = [x + y for x, y in zip(bottom, counts)]
    b.set_xlabel("expert")
    b.set_ylabel("seed samples owned")
    b.set_title("bucket sizes by domain")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_owner_share(before: dict, after: dict, path: Path) -> None:
    plt = _pyplot()
    layers = range(len(before["top_k"]))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(layers, [100 * x for x in before["top_k"]], "o--", label="before router init (top-k)")
    ax.plot(layers, [100 * x for x in after["top_k"]], "o-", label="after router init (top-k)")
    ax.plot(layers, [100 * x for x in after["top_1"]], "s:", label="after (top-1)")
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("bucket tokens routed to their owner (%)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_loss(history: list[dict], path: Path, title: str) -> None:
    """Train loss (the Trainer's logged means) and eval loss over optimizer steps."""
    plt = _pyplot()
    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    if train:
        ax.plot(*zip(*train), "-", marker="." if len(train) < 50 else None, label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o--", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
