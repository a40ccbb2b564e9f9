"""Per-checkpoint evaluation of stage 1: every checkpoint scored per domain, as a table and a plot.

Scores are cached in the manifest, so a rerun only scores checkpoints it has not scored yet.
LoRA checkpoints are loaded as adapter weights into one peft model; full checkpoints as models.
"""

from __future__ import annotations

import json
from pathlib import Path

from upcycle.config import checkpoints_to_score
from upcycle.manifest import Manifest
from upcycle.suite.mixes import make_suite
from upcycle.suite.tasks import DOMAINS


def suite_test_items(spec, max_per_domain: int | None):
    suite = make_suite(spec)
    items, counts = [], {}
    for item in suite.test:
        if max_per_domain is None or counts.get(item.domain, 0) < max_per_domain:
            items.append(item)
            counts[item.domain] = counts.get(item.domain, 0) + 1
    return items


def eval_signature(suite_spec, max_per_domain: int | None) -> str:
    """Which test items scores were computed on: recorded beside the scores, so that a rerun with other
    evaluation settings scores again instead of reusing them."""
    import hashlib

    key = json.dumps({"suite": suite_spec.model_dump(mode="json"), "max_per_domain": max_per_domain}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def evaluate_checkpoints(manifest: Manifest, base: Path, cfg, tokenizer, progress: bool = True) -> list[dict]:
    """Each checkpoint (cfg.eval_checkpoints: all, the last, or none) on this process's accelerator, in the
    dtype prepare trained it in. Under torchrun the checkpoints are shared out across ranks, one round
    of `world size` at a time, and rank 0 records each round's scores (a rerun scores only what no
    round recorded with these evaluation settings)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from upcycle import distributed as dist
    from upcycle.devices import accelerator
    from upcycle.eval.suite_eval import evaluate_items
    from upcycle.train.engine import compute_dtype

    items = suite_test_items(cfg.data.suite, cfg.eval_max_items)
    signature = eval_signature(cfg.data.suite, cfg.eval_max_items)
    which = checkpoints_to_score(cfg.eval_checkpoints, delivers=True)  # a prepare of its own delivers its model
    chosen = {"all": manifest.checkpoints, "last": manifest.checkpoints[-1:], "none": []}[which]
    todo = [c for c in chosen if c.get("scored_with") != signature]
    loaded: dict = {}  # LoRA: one peft model per rank, its adapter weights swapped per checkpoint

    def score(entry: dict) -> dict:
        ckpt = manifest.folder / entry["path"]
        if cfg.mode == "lora":
            if "peft" not in loaded:
                from upcycle.train.dense import load_model
                loaded["peft"] = load_model(base, cfg).to(accelerator())
            from peft import set_peft_model_state_dict
            set_peft_model_state_dict(loaded["peft"], load_file(ckpt / "adapter_model.safetensors"))
            model = loaded["peft"]
        else:
            model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=compute_dtype(cfg.train)).to(accelerator())
        result = evaluate_items(model, tokenizer, items, progress=progress and dist.world_size() == 1)
        return {"scores": result["scores"], "average": result["average"], "scored_with": signature}

    for start in range(0, len(todo), dist.world_size()):
        batch = todo[start:start + dist.world_size()]
        for entry, result in zip(batch, dist.map_sharded(score, batch)):
            entry.update(result)
            if progress and dist.is_main():
                print(f"checkpoint {entry['index']} (epoch {entry['epoch']}): "
                      + ", ".join(f"{d} {100 * s:.1f}" for d, s in result["scores"].items()), flush=True)
        manifest.save()  # rank 0 only
    dist.on_rank_zero_then_wait(lambda: write_report(manifest), share=False)
    return manifest.checkpoints


def score_table(checkpoints: list[dict]) -> str:
    domains = [d for d in DOMAINS if d in checkpoints[0]["scores"]]
    best = {d: max(c["scores"][d] for c in checkpoints) for d in domains}
    head = "| checkpoint | epoch | " + " | ".join(domains) + " | average |"
    lines = [head, "|" + " --- |" * (len(domains) + 3)]
    for c in checkpoints:
        cells = [f"**{100 * c['scores'][d]:.1f}**" if c["scores"][d] == best[d] else f"{100 * c['scores'][d]:.1f}" for d in domains]
        lines.append(f"| {c['index']} | {c['epoch']:.2f} | " + " | ".join(cells) + f" | {100 * c['average']:.1f} |")
    return "\n".join(lines)


def best_checkpoint_per_domain(checkpoints: list[dict]) -> dict[str, int]:
    domains = [d for d in DOMAINS if d in checkpoints[0]["scores"]]
    return {d: max(checkpoints, key=lambda c: (c["scores"][d], -c["index"]))["index"] for d in domains}


def write_report(manifest: Manifest) -> None:
    checkpoints = [c for c in manifest.checkpoints if c.get("scores")]
    if not checkpoints:
        return
    folder = manifest.folder
    best = best_checkpoint_per_domain(checkpoints)
    text = ("# Per-checkpoint scores on the built-in suite (%)\n\n" + score_table(checkpoints)
            + "\n\nBest checkpoint per domain: " + ", ".join(f"{d} -> {i}" for d, i in best.items()) + "\n")
    (folder / "checkpoint_scores.md").write_text(text)
    (folder / "checkpoint_scores.json").write_text(json.dumps(
        [{k: c[k] for k in ("index", "step", "epoch", "scores", "average", "train_loss", "eval_loss")} for c in checkpoints],
        indent=2))
    plot_checkpoint_scores(checkpoints, folder / "checkpoint_scores.png")


def plot_checkpoint_scores(checkpoints: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = [d for d in DOMAINS if d in checkpoints[0]["scores"]]
    epochs = [c["epoch"] for c in checkpoints]
    fig, ax = plt.subplots(figsize=(7, 4))
    for d in domains:
        ys = [100 * c["scores"][d] for c in checkpoints]
        line, = ax.plot(epochs, ys, marker="o", label=d)
        i = max(range(len(ys)), key=ys.__getitem__)
        ax.scatter([epochs[i]], [ys[i]], s=140, facecolors="none", edgecolors=line.get_color(), linewidths=2)
    ax.plot(epochs, [100 * c["average"] for c in checkpoints], "k--", label="average")
    ax.set_xlabel("epoch of checkpoint")
    ax.set_ylabel("score (%)")
    ax.set_title("Stage 1 checkpoints on the built-in suite (circle: best per domain)")
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
