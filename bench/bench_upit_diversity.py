"""Measure what UpIT's defaults are chosen by: the diversity of the expert pool and what router
pre-training does with it, on SmolLM2-135M-Instruct with the reproduction's data (seed 0).

    .venv/bin/python bench/bench_upit_diversity.py            # ~25 min on 2 cores
    .venv/bin/python bench/bench_upit_diversity.py --seed 1 --out bench/results/diversity-seed1

Variants of stages 1-3 (prepare, expand, route; no post-training, no scoring), each a real
`upcycle run recipes/upit_lora.yaml` with bench/reproduce.py's SmolLM2 overrides:

    before      the settings of the issue-14 table: 4 checkpoints, stage 1 annealed to 0 by its end,
                LoRA children by delta + SVD, 24 seed samples, 2 router epochs
    annealed    today's defaults (8 checkpoints, factor children, 1% seed set with a floor of 4 per
                expert, 4 router epochs) but stage 1 still annealed to 0 by its end
    horizon4    the same with the schedule of the whole 4-epoch budget (stage 1 stops half way down)
    constant    the same with a constant rate after warmup

    shipped     the recipe as it is

A variant already measured under --out is reported, not rerun. Then, on the pool the recipe ships
with, router pre-training with each target (one_hot,
positive_only, softmax): the share of each bucket's tokens routed to its owner, before and after.
Prints one table (and writes it to --out/diversity.md): the pool's checkpoint task-vector cosine,
the children's cosine to the plain mix of their parents, the per-sample perplexity spread, the
argmin buckets and their entropy, and the owner shares.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from reproduce import PROFILES  # noqa: E402 - the reproduction's SmolLM2 settings, one definition

STAGES = "stages=[prepare,expand,route]"
# Each variant spelled out whole, so it does not move when the recipe's defaults do. route.seed_fraction=0.05
# and the recipe's 0.01 draw the same 32 samples here (the floor of 4 per expert decides).
SCHEDULE = ["route.seed_fraction=0.05"]
VARIANTS = {
    "before": ["prepare.save_every=0.5", "prepare.train.scheduler=cosine", "prepare.train.schedule_epochs=null",
               "expand.lora_merge=delta_svd", "route.seed_count=24", "route.train.epochs=2", *SCHEDULE],
    "annealed": ["prepare.train.scheduler=cosine", "prepare.train.schedule_epochs=null", *SCHEDULE],
    "horizon4": ["prepare.train.scheduler=cosine", "prepare.train.schedule_epochs=4", *SCHEDULE],
    "constant": ["prepare.train.scheduler=constant_with_warmup", "prepare.train.schedule_epochs=null", *SCHEDULE],
}
TARGETS = ("one_hot", "positive_only", "softmax")


def run_variant(out: Path, seed: int, extra: list[str]) -> float:
    """Stages 1-3 of the variant (a rerun skips what is finished); returns their seconds as run.json records them."""
    from upcycle.config_io import load_config
    from upcycle.pipeline import RunConfig, run

    prof = PROFILES["smollm2"]
    overrides = [*prof.overrides, f"data.suite.train_per_domain={prof.train_per_domain}", f"out={out}", f"seed={seed}",
                 f"data.suite.seed={seed}", "evaluate=false", STAGES, *extra]
    run(load_config(RunConfig, ROOT / "recipes" / "upit_lora.yaml", overrides), progress=False)
    stages = json.loads((out / "run.json").read_text())["stages"]
    return sum(s.get("seconds", 0.0) for s in stages.values())


def route_with(target: str, run_folder: Path, out: Path) -> dict:
    """The recipe's route stage again on the same pool, with another pre-training target."""
    from upcycle.config import RouteConfig
    from upcycle.config_io import load_config
    from upcycle.stages import route

    cfg = load_config(RouteConfig, run_folder / "route" / "upcycle_config.yaml",
                      [f"out={out}", f"expand={run_folder / 'expand'}", f"aux_target={target}"])
    return route.run(cfg, progress=False)


def summary(run_folder: Path) -> dict:
    expand = json.loads((run_folder / "expand" / "manifest.json").read_text())
    route = json.loads((run_folder / "route" / "manifest.json").read_text())
    d = route["diversity"]
    return {"checkpoint cosine min/mean/max": "{min:.4f} / {mean:.4f} / {max:.4f}".format(**expand["diversity"]["checkpoint_cosine"]),
            "children: cosine to mix (mean)": f"{statistics.mean(r['cosine_to_mix'] for r in expand['lineage']):.3f}"
            if expand["lineage"] else "-",
            "seed samples": len(route["owners"]),
            "ppl spread median / max": f"{d['ppl_spread']['median']:.3f} / {d['ppl_spread']['max']:.3f}",
            "argmin buckets (entropy)": f"{d['argmin_bucket_sizes']} ({d['argmin_bucket_entropy']:.2f})",
            "owner share top-k before -> after": share(route),
            "degenerate": "yes: " + " / ".join(w for w in (expand["diversity"]["warning"], d["warning"]) if w)
            if expand["diversity"]["degenerate"] or d["degenerate"] else "no"}


def share(route_manifest: dict) -> str:
    before, after = route_manifest["share_before"], route_manifest["share_after"]
    mean = lambda xs: 100 * sum(xs) / len(xs)  # noqa: E731
    return f"{mean(before['top_k']):.0f}% -> {mean(after['top_k']):.0f}% (top-1 {mean(after['top_1']):.0f}%)"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "diversity"))
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    args = ap.parse_args()
    out = Path(args.out)
    rows, seconds = {}, {}
    for name in args.variants:
        folder = out / name
        route = folder / "route" / "manifest.json"
        if route.is_file() and json.loads(route.read_text()).get("complete"):  # measured already: report it
            seconds[name] = sum(s.get("seconds", 0.0) for s in json.loads((folder / "run.json").read_text())["stages"].values())
        else:
            seconds[name] = run_variant(folder, args.seed, VARIANTS[name])
        rows[name] = summary(folder)
        print(f"{name}: {rows[name]} ({seconds[name] / 60:.1f} min)", flush=True)
    shipped = out / "shipped"  # the recipe as it is, for the router-target comparison
    run_variant(shipped, args.seed, [])
    rows["shipped"], seconds["shipped"] = summary(shipped), run_variant(shipped, args.seed, [])
    targets = {}
    for target in TARGETS:
        folder = out / f"route-{target}"  # each target from the same pool and seed set
        route_with(target, shipped, folder)
        targets[target] = share(json.loads((folder / "manifest.json").read_text()))
        print(f"route target {target}: owner share {targets[target]}", flush=True)

    keys = list(next(iter(rows.values())))
    lines = ["| variant | " + " | ".join(keys) + " | minutes |", "|" + " --- |" * (len(keys) + 2)]
    lines += [f"| {name} | " + " | ".join(str(r[k]) for k in keys) + f" | {seconds[name] / 60:.1f} |" for name, r in rows.items()]
    lines += ["", "| router pre-training target (shipped pool) | bucket tokens routed to their owner, top-k before -> after |",
              "| --- | --- |"] + [f"| {t} | {v} |" for t, v in targets.items()]
    text = f"SmolLM2-135M-Instruct, seed {args.seed}, stages 1-3 of upit_lora with bench/reproduce.py's overrides\n\n" \
        + "\n".join(lines) + "\n"
    (out / "diversity.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
