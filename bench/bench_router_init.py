"""Router initialization for experts trained apart, on a constructed case (issue 12).

A tiny base; three synthetic domains with disjoint character sets (lower-case words, digit sums,
upper-case/punctuation patterns); one full fine-tune per domain (the branch stage); then the MoE
mixed from them with each router init (ppl, prompts, cheap_embed, random), no post-training.
Reported per init and domain: the share of the domain's held-out tokens whose top-1 expert (per
MoE layer, averaged) is the domain's own expert, and the MoE's perplexity on the domain's
responses against the own expert alone (the dense fine-tune) on them.

    .venv/bin/python bench/bench_router_init.py [--workdir runs/bench_router_init] [--rows 60] [--epochs 6]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

INITS = ("ppl", "prompts", "cheap_embed", "random")


def domain_row(domain: str, rng: random.Random) -> dict:
    """One instruction row; each domain uses its own characters only."""
    if domain == "words":
        w = "".join(rng.choice("abcdefgh") for _ in range(4))
        return {"instruction": f"echo {w}", "output": f"{w} {w[::-1]}", "domain": domain}
    if domain == "digits":
        a, b = rng.randint(10, 49), rng.randint(10, 49)
        return {"instruction": f"{a}+{b}", "output": f"{a + b}", "domain": domain}
    s = "".join(rng.choice("XYZ!?#") for _ in range(3))
    return {"instruction": f"ECHO {s}", "output": f"{s}{s}{s}", "domain": domain}


DOMAINS = ("digits", "shout", "words")  # sorted: the branch stage's (and so the experts') order


def write_data(path: Path, rows: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    data = [domain_row(d, rng) for _ in range(rows) for d in DOMAINS]
    path.write_text("".join(json.dumps(r) + "\n" for r in data))
    return data


@torch.no_grad()
def measure(model, tokenizer, rows: list[dict], own: int | None) -> dict:
    """Own-expert top-1 share (MoE only, own is not None) and perplexity on the response tokens."""
    from upcycle.config import DataSpec
    from upcycle.data.dataset import encode_all
    from upcycle.data.instructions import to_conversation
    from upcycle.moe.model import router_logits
    from upcycle.routing.scoring import response_nll
    from upcycle.train.trainer import pad_batch

    convs = [to_conversation(r, "alpaca", f"row{i}") for i, r in enumerate(rows)]
    samples, _ = encode_all(convs, tokenizer, DataSpec().max_length, "truncate")
    pad = tokenizer.pad_token_id
    ids, labels, mask = pad_batch(samples, pad)
    model.eval()
    out = model(input_ids=ids, attention_mask=mask)
    nll = response_nll(out.logits, labels)
    result = {"ppl": float(nll.mean().exp())}
    if own is not None:
        keep = mask.reshape(-1).bool()
        shares = [float((l[keep].argmax(-1) == own).float().mean()) for l in router_logits(model)]
        result["share"] = sum(shares) / len(shares)
    return result


def run(workdir: Path, rows: int = 60, epochs: float = 6, seed: int = 0, progress: bool = False) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from upcycle.config import BranchConfig, MixConfig
    from upcycle.export.load import load_moe
    from upcycle.stages import branch, mix
    from upcycle.tiny import save_tiny_model

    workdir.mkdir(parents=True, exist_ok=True)
    base = workdir / "base"
    if not (base / "config.json").exists():
        save_tiny_model("llama", base, seed=seed)
    train = workdir / "train.jsonl"
    write_data(train, rows, seed)
    test = [r for r in write_data(workdir / "test.jsonl", 10, seed + 1)]
    data = {"train": [str(train)], "max_length": 64, "eval_fraction": 0.0}
    made = branch.run(BranchConfig(base=str(base), out=workdir / "branch", seed=seed, data=data, mode="full",
                                   train={"epochs": epochs, "lr": 1e-2, "batch_size": 8}), progress=progress)
    tokenizer = AutoTokenizer.from_pretrained(base)
    by_domain = {d: [r for r in test if r["domain"] == d] for d in DOMAINS}
    rng = random.Random(seed + 2)
    prompts = [{"positive": [f"{r['instruction']}\n{r['output']}" for r in (domain_row(d, rng) for _ in range(4))]}
               for d in DOMAINS]
    alone = {d: measure(AutoModelForCausalLM.from_pretrained(made["experts"][i], dtype=torch.float32), tokenizer,
                        by_domain[d], None)["ppl"] for i, d in enumerate(DOMAINS)}
    table = {}
    for init in INITS:
        out = workdir / f"mix_{init}"
        cfg = MixConfig(base=str(base), branch=workdir / "branch", out=out, seed=seed, shared="average",
                        router_init=init, prompts=prompts, data=data, moe={"top_k": 1}, force=True,
                        export={"format": "upcycle"},
                        ppl={"seed_count": 30, "train": {"epochs": 4, "lr": 1e-2, "batch_size": 8}})
        mix.run(cfg, progress=progress)
        model = load_moe(out / mix.MODEL)
        table[init] = {d: measure(model, tokenizer, by_domain[d], i) for i, d in enumerate(DOMAINS)}
    return {"alone": alone, "table": table, "lineage": made["domains"]}


def markdown(result: dict) -> str:
    lines = ["| router init | " + " | ".join(f"{d}: own-expert share" for d in DOMAINS) + " | "
             + " | ".join(f"{d}: ppl MoE / expert alone" for d in DOMAINS) + " |",
             "|" + " --- |" * (1 + 2 * len(DOMAINS))]
    for init, per in result["table"].items():
        shares = [f"{100 * per[d]['share']:.0f}%" for d in DOMAINS]
        ppls = [f"{per[d]['ppl']:.2f} / {result['alone'][d]:.2f}" for d in DOMAINS]
        lines.append(f"| {init} | " + " | ".join(shares + ppls) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="runs/bench_router_init", type=Path)
    ap.add_argument("--rows", type=int, default=60, help="training rows per domain")
    ap.add_argument("--epochs", type=float, default=6, help="epochs of each domain expert's fine-tuning")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    result = run(args.workdir, args.rows, args.epochs, args.seed)
    (args.workdir / "results.json").write_text(json.dumps(result, indent=1))
    print(markdown(result))


if __name__ == "__main__":
    main()
