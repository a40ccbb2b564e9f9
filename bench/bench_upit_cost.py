"""UpIT's wall time against LoRAMoE_SFT's at equal data (issue 25's goal: at most 1.5x), both run in this
one invocation, one after the other, at the SmolLM2 table's size and with each recipe's default
evaluation (`eval_checkpoints: auto`: UpIT scores its MoE, not its stage-1 checkpoints; Figure 2 is opt-in).

    .venv/bin/python bench/bench_upit_cost.py [--seed 1] [--out DIR] [--model smollm2]

Prints each run's minutes per stage (the pipeline's own `cost` record) and the ratio. Run it with nothing
else on the machine: both runs share the same cores, so a busy machine skews the ratio only if the load
changes between them. Writes nothing outside --out (a temporary folder, removed, by default).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reproduce  # noqa: E402  (bench/reproduce.py: the table's profiles and recipe configs)

RECIPES = ("loramoe_sft", "upit_lora")
GOAL = 1.5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(reproduce.PROFILES), default="smollm2")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default=None, help="keep the runs here (default: a temporary folder, removed)")
    args = ap.parse_args()
    from upcycle.pipeline import run

    prof = reproduce.PROFILES[args.model]
    items = [] if prof.eval_items is None else [f"eval_max_items={prof.eval_items}"]
    size = [*prof.overrides, f"data.suite.train_per_domain={prof.train_per_domain}", *items]
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="upit-cost-"))
    minutes, stages = {}, {}
    try:
        for recipe in RECIPES:
            cfg = reproduce.recipe_config(recipe, args.seed, root / recipe, size + prof.per_recipe.get(recipe, []))
            t0 = time.perf_counter()
            result = run(cfg, progress=False)
            minutes[recipe] = (time.perf_counter() - t0) / 60
            stages[recipe] = {s: c["seconds"] / 60 for s, c in result["cost"].items()}
            print(f"{recipe:12s} {minutes[recipe]:5.1f} min  (" + ", ".join(f"{s} {m:.1f}" for s, m in stages[recipe].items())
                  + f"); average {100 * result['average']:.1f}", flush=True)
    finally:
        if not args.out:
            shutil.rmtree(root, ignore_errors=True)
    ratio = minutes["upit_lora"] / minutes["loramoe_sft"]
    print(f"UpIT / LoRAMoE_SFT wall time: {ratio:.2f}x (goal <= {GOAL}x: {'met' if ratio <= GOAL else 'NOT met'})")
    print(json.dumps({"model": args.model, "seed": args.seed, "minutes": minutes, "stage_minutes": stages,
                      "ratio": ratio}))


if __name__ == "__main__":
    main()
