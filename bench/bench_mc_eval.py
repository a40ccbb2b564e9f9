"""Benchmark: multiple-choice scoring of SmolLM2-135M-Instruct on the smol mix's MC test items,
one item per forward pair (batch 1) vs 32 items per batch (the suite eval's default).

    .venv/bin/python bench/bench_mc_eval.py [--items 100] [--repeats 2]

Both settings run in the same process on the same items (fp32, CPU threads as set by torch); the
figures are the best wall time of each, their ratio, and whether both chose the same option on every
item (batching must change only float rounding). Goal (issue 14's budget): ratio < 1.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=100, help="MC test items (the smol mix has 100 per seed)")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from reproduce import PROFILES, recipe_config
    from upcycle.models import resolve_model
    from upcycle.eval.checkpoints import suite_test_items
    from upcycle.eval.suite_eval import evaluate_items

    prof = PROFILES["smollm2"]
    cfg = recipe_config("dense_lora", 0, Path("/tmp/bench_mc_eval_unused"),
                        [*prof.overrides, f"data.suite.train_per_domain={prof.train_per_domain}"])
    items = [i for i in suite_test_items(cfg.data.suite, None) if i.domain == "mc"][:args.items]
    base = resolve_model(cfg.base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(base)

    timings, outputs = {}, {}
    for batch_size in (1, 32):
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            result = evaluate_items(model, tokenizer, items, batch_size=batch_size)
            best = min(best, time.perf_counter() - t0)
        timings[batch_size] = best
        outputs[batch_size] = [o["output"] for o in result["outputs"]]
        print(f"batch {batch_size:2d}: {best:6.1f} s for {len(items)} MC items, accuracy {100 * result['scores']['mc']:.0f} %",
              flush=True)
    same = sum(a == b for a, b in zip(outputs[1], outputs[32]))
    print(f"ratio batch 32 / batch 1: {timings[32] / timings[1]:.2f} (goal < 1); "
          f"same choice on {same} of {len(items)} items")


if __name__ == "__main__":
    main()
