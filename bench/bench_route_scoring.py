"""Benchmark: perplexity scoring of seed data under 8 LoRA experts, batched vs each expert alone.

    .venv/bin/python bench/bench_route_scoring.py [--base bundled:suite-base] [--samples 64] [--experts 8]

Three ways, same samples, same experts (peft adapters on the MLP with random B, so they differ):
  batched   upcycle's route scoring: one model, every expert in one forward per batch
  forced    the same model, one pass per expert
  alone     the usual way: for each expert, load the dense model with its adapter (peft) and score
Reports wall time, the ratio to `alone`, and the largest relative difference of the perplexities
(goal, issue 5: batched >= 3x faster than alone, equal to 1e-5 relative).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="bundled:suite-base")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(2)

    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from upcycle.models import resolve_model
    from upcycle.config import MoESpec
    from upcycle.data.encode import encode
    from upcycle.data.instructions import to_conversation
    from upcycle.moe.assemble import build_pool_model, pool_from_expand
    from upcycle.routing.scoring import response_nll, score_experts, score_one_expert
    from upcycle.suite.tasks import Suite
    from upcycle.train.trainer import pad_batch

    base = resolve_model(args.base)
    tok = AutoTokenizer.from_pretrained(base)
    rows = Suite(0).rows("train")[: args.samples]
    samples = [encode(to_conversation(r, "alpaca", "b"), tok, 256)[0] for r in rows]
    work = Path(tempfile.mkdtemp(prefix="bench-route-", dir=ROOT / "bench"))
    try:
        experts = []
        for e in range(args.experts):
            torch.manual_seed(e)
            m = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                               LoraConfig(r=16, lora_alpha=32, target_modules=["gate_proj", "up_proj", "down_proj"]))
            with torch.no_grad():
                for n, p in m.named_parameters():
                    if "lora_B" in n:
                        p.normal_(0, 0.02)
            m.save_pretrained(work / f"expert{e}")
            experts.append({"index": e, "origin": "checkpoint", "path": str(work / f"expert{e}"), "sha256": ""})
        (work / "manifest.json").write_text(json.dumps({"stage": "expand", "complete": True, "base": str(base),
                                                        "kind": "lora", "experts": experts}))
        pad = tok.pad_token_id

        start = time.perf_counter()
        model = build_pool_model(pool_from_expand(work), MoESpec(num_experts=args.experts, top_k=2), "average", 0)
        batched = score_experts(model, samples, args.experts, args.batch, pad)
        t_batched = time.perf_counter() - start

        start = time.perf_counter()
        forced = torch.stack([score_one_expert(model, samples, e, args.batch, pad) for e in range(args.experts)], 1)
        t_forced_scoring = time.perf_counter() - start

        start = time.perf_counter()
        alone = []
        for e in range(args.experts):
            m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), work / f"expert{e}").eval()
            nll = []
            with torch.no_grad():
                for i in range(0, len(samples), args.batch):
                    ids, labels, mask = pad_batch(samples[i:i + args.batch], pad)
                    nll.append(response_nll(m(input_ids=ids, attention_mask=mask).logits, labels))
            alone.append(torch.cat(nll).exp())
        alone = torch.stack(alone, 1)
        t_alone = time.perf_counter() - start

        rel = ((batched - alone).abs() / alone).max().item()
        spread = ((batched.max(1).values - batched.min(1).values) / batched.min(1).values).mean().item()
        print(f"{args.experts} LoRA experts x {len(samples)} seed samples on {base.name}")
        print(f"batched (upcycle): {t_batched:6.2f} s  (model assembly included)")
        print(f"forced, per expert: {t_forced_scoring:6.2f} s  (scoring only, same model)")
        print(f"alone (peft load per expert): {t_alone:6.2f} s")
        print(f"speed-up vs alone: {t_alone / t_batched:.1f}x; vs per-expert passes: {t_forced_scoring / t_batched:.1f}x")
        print(f"max relative difference of perplexities, batched vs alone: {rel:.2e} "
              f"(goal <= 1e-5: {'met' if rel <= 1e-5 else 'NOT met'}); batched vs forced: "
              f"{((batched - forced).abs() / forced).max().item():.2e}")
        print(f"experts differ: mean relative spread of a sample's perplexity across experts {spread:.3f}")
        print(f"goal speed-up >= 3x vs alone: {'met' if t_alone / t_batched >= 3 else 'NOT met'}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
