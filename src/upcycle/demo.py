"""`upcycle demo`: what upcycle does, on bundled models, in about ten minutes on two CPU cores.

    ./scripts/demo.sh            (or: upcycle demo --workdir runs/demo)

1. One-shot upcycling of a real model: SmolLM2-135M-Instruct (bundled as GGUF, converted once)
   into an 8-expert MoE, reloaded with stock transformers (MixtralForCausalLM), chatting.
2. UpIT on the built-in task suite with the bundled 2.6M-parameter base: stage-1 checkpoints
   scored per domain, genetic expansion, perplexity buckets and router pre-training, post-training;
   against the dense LoRA and LoRAMoE baselines at the same data budget; a results table and the
   routing heatmap by domain.
The demo sizes (evaluation items) are smaller than the reproduction in bench/ (issue 6).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

QUESTION = "What is the capital of France? Answer in one sentence."
RECIPES = Path(__file__).resolve().parents[2] / "recipes"
DEMO_OVERRIDES = ["eval_max_items=25"]


def _chat(model, tokenizer, question: str, max_new_tokens: int = 40) -> str:
    import torch

    messages = [{"role": "user", "content": question}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def one_shot_part(args, workdir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from upcycle.bundled import smollm2_dir

    out = workdir / "smollm2-moe"
    print("== 1. one-shot upcycling of a real model: SmolLM2-135M-Instruct -> 8-expert MoE ==", flush=True)
    base = smollm2_dir()
    cmd = [sys.executable, "-m", "upcycle.cli", "build", "--base", str(base), "--out", str(out), "--force", "--json",
           "--quiet", "--num-experts", str(args.num_experts), "--top-k", str(args.top_k), "--init", args.init]
    print("$ upcycle build " + " ".join(cmd[4:]), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(proc.returncode)
    s = json.loads(proc.stdout)
    p = s["parameters"]
    print(f"  experts      {s['experts']} per layer x {s['moe_layers']} layers, top-{s['top_k']}, routing {s['routing']}, init {s['init']}")
    print(f"  parameters   dense {s['dense_parameters'] / 1e6:.1f}M -> {p['total'] / 1e6:.1f}M total, {p['active'] / 1e6:.1f}M active per token")
    print(f"  format       {s['format']} ({len(s['files'])} safetensors file(s), {s['bytes'] / 1e9:.2f} GB)")
    print(f"  time         {s['seconds']:.1f} s;  peak memory {s['peak_rss_mb']:.0f} MB (RSS of the build process)")
    tokenizer = AutoTokenizer.from_pretrained(out)
    moe = AutoModelForCausalLM.from_pretrained(out).eval()
    dense = AutoModelForCausalLM.from_pretrained(base).eval()
    ids = tokenizer("Upcycling turns a dense model into a mixture of experts.", return_tensors="pt")
    with torch.no_grad():
        diff = (moe(**ids).logits - dense(**ids).logits).abs().max().item()
    print(f"  reloaded with stock transformers as {type(moe).__name__}; max |logit - dense logit| = {diff:.1e}")
    t0 = time.perf_counter()
    print(f"  user: {QUESTION}\n  MoE:  {_chat(moe, tokenizer, QUESTION)}   [{time.perf_counter() - t0:.1f} s]")
    del moe, dense


def results_table(rows: list[tuple[str, dict]]) -> str:
    from upcycle.suite.tasks import DOMAINS

    lines = ["| method | " + " | ".join(DOMAINS) + " | average |", "|" + " --- |" * (len(DOMAINS) + 2)]
    for name, r in rows:
        scores = r.get("scores") or {}
        cells = [f"{100 * scores[d]:.1f}" if d in scores else "-" for d in DOMAINS]
        avg = f"{100 * r['average']:.1f}" if r.get("average") is not None else "-"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {avg} |")
    return "\n".join(lines)


def upit_part(workdir: Path) -> None:
    from transformers import AutoTokenizer

    from upcycle.config_io import load_config
    from upcycle.eval.checkpoints import suite_test_items
    from upcycle.eval.routing import plot_routing, routing_shares, specialization, suite_texts
    from upcycle.export.load import load_moe
    from upcycle.manifest import read_manifest
    from upcycle.pipeline import RunConfig, run

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # checkpoint writes and loads would print a bar each
    print("\n== 2. UpIT on the built-in suite (bundled 2.6M-parameter base), against two baselines ==", flush=True)
    rows = []
    for recipe in ("upit_lora", "dense_lora", "loramoe_sft"):
        shutil.rmtree(workdir / recipe, ignore_errors=True)  # a demo starts fresh (recipes resume; see upcycle run)
        figure2 = ["eval_checkpoints=all"] if recipe == "upit_lora" else []  # the paper's Figure 2, shown below
        cfg = load_config(RunConfig, RECIPES / f"{recipe}.yaml", [f"out={workdir / recipe}", *DEMO_OVERRIDES, *figure2])
        t0 = time.perf_counter()
        print(f"-- {recipe}: {' -> '.join(cfg.stages)}", flush=True)
        result = run(cfg, progress=True)  # each stage announces itself and shows its progress bar
        print(f"  {recipe:12s} done in {time.perf_counter() - t0:5.0f} s: average {100 * (result.get('average') or 0):.1f}",
              flush=True)
        rows.append((recipe, result))
        if recipe == "upit_lora":
            upit_dir = workdir / recipe
            print("\n" + (upit_dir / "prepare" / "checkpoint_scores.md").read_text())
            lineage = json.loads((upit_dir / "expand" / "lineage.json").read_text())
            for r in lineage["rounds"]:
                print(f"  expansion round {r['round']}: child {r['child']} = DARE({r['alpha']:.2f} * tau_{r['parents'][0]}) "
                      f"+ DARE({1 - r['alpha']:.2f} * tau_{r['parents'][1]})")
            route = read_manifest(upit_dir / "route", "route")
            pool = read_manifest(upit_dir / "expand", "expand").diversity
            print(f"  expert pool: checkpoint task-vector cosine {pool['checkpoint_cosine']['mean']:.3f} (mean), "
                  f"children's cosine to the plain mix of their parents "
                  f"{sum(r['cosine_to_mix'] for r in lineage['rounds']) / max(1, len(lineage['rounds'])):.2f}; "
                  f"per-sample perplexity spread {route.diversity['ppl_spread']['median']:.3f} (median)")
            print(f"  seed buckets per expert: {[b.size for b in route.buckets.values()]}")
            before, after = route.share_before.top_k, route.share_after.top_k
            print(f"  bucket tokens routed to their owner (mean over layers): {100 * sum(before) / len(before):.0f}% "
                  f"before router init -> {100 * sum(after) / len(after):.0f}% after\n")
    table = results_table(rows)
    print("Results on the suite's test items (%):\n" + table)
    (workdir / "results.md").write_text(table + "\n")

    model = load_moe(workdir / "upit_lora" / "post_train" / "model")
    tokenizer = AutoTokenizer.from_pretrained(workdir / "upit_lora" / "post_train" / "model")
    spec = load_config(RunConfig, RECIPES / "upit_lora.yaml", []).data.suite
    shares = routing_shares(model, tokenizer, suite_texts(tokenizer, suite_test_items(spec, 20)))
    plot_routing(shares, workdir / "routing.png", title="UpIT MoE: share of each domain's tokens per expert")
    spec_scores = specialization(shares)
    print("\nrouting specialization per domain (0 = even spread, 1 = one fixed set of experts): "
          + ", ".join(f"{d} {v:.2f}" for d, v in spec_scores.items()))
    print(f"plots: {workdir / 'routing.png'}, {workdir / 'upit_lora' / 'prepare' / 'checkpoint_scores.png'}, "
          f"{workdir / 'upit_lora' / 'expand' / 'similarity.png'}, {workdir / 'upit_lora' / 'route' / 'buckets.png'}")


def run(args) -> None:
    workdir = Path(args.workdir)
    started = time.perf_counter()
    one_shot_part(args, workdir)
    upit_part(workdir)
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s; outputs under {workdir}")
