"""Benchmark: greedy generation for the suite's generation domains (code, math, knowledge) on
SmolLM2-135M-Instruct, in batches of 32 (the suite eval's default) against larger batches.

    .venv/bin/python bench/bench_generation.py [--batches 32 128] [--repeats 1] [--seed 0]

On a CPU each decoding step reads every weight once whatever the batch, so fewer, larger batches
should take fewer weight passes; left padding grows with the batch. All settings run in this process
on the same items (fp32); the figures are each setting's best wall time, the ratio to the first
setting, and on how many items the completions are identical (batching must change only float
rounding: greedy text may differ only where two tokens nearly tie).
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
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0, help="which seed's test items (the table's data.suite.seed)")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from reproduce import PROFILES, recipe_config
    from upcycle.eval.checkpoints import suite_test_items
    from upcycle.eval.suite_eval import generate, new_token_budget, prompt_text
    from upcycle.models import resolve_model

    prof = PROFILES["smollm2"]
    cfg = recipe_config("dense_lora", args.seed, Path("/tmp/bench_generation_unused"),
                        [*prof.overrides, f"data.suite.train_per_domain={prof.train_per_domain}"])
    items = [i for i in suite_test_items(cfg.data.suite, None) if i.domain != "mc"]
    base = resolve_model(cfg.base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(base)
    domains = sorted({i.domain for i in items})

    timings, outputs = {}, {}
    for batch_size in args.batches:
        best = float("inf")
        for _ in range(args.repeats):
            t0, texts = time.perf_counter(), []
            for d in domains:
                todo = [i for i in items if i.domain == d]
                texts += generate(model, tokenizer, [prompt_text(tokenizer, i) for i in todo], new_token_budget(todo[0]),
                                  batch_size)
            best = min(best, time.perf_counter() - t0)
        timings[batch_size], outputs[batch_size] = best, texts
        print(f"batch {batch_size:3d}: {best:6.1f} s for {len(items)} items ({', '.join(domains)})", flush=True)
    first = args.batches[0]
    for b in args.batches[1:]:
        same = sum(x == y for x, y in zip(outputs[first], outputs[b]))
        print(f"batch {b} / batch {first}: time ratio {timings[b] / timings[first]:.2f}; identical completions on "
              f"{same} of {len(items)} items")


if __name__ == "__main__":
    main()
