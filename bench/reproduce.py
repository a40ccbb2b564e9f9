"""Reproduce the paper's comparisons on the built-in suite: UpIT, the baselines and the ablations at
equal data over several seeds, plus data-scaling and expert-scaling curves.

    .venv/bin/python bench/reproduce.py                      # the default size (see README "Results")
    .venv/bin/python bench/reproduce.py --seeds 0 1 2 3 4 --train-per-domain 200 --eval-items 50   # larger

Every run is `upcycle run recipes/<recipe>.yaml` with the seed, the suite size and the output folder
overridden; finished runs are skipped on a rerun (the pipeline's manifests), so an interrupted
reproduction continues. Writes results.md (mean +- std per domain, the paper's layout),
results.json, data_scaling.png and expert_scaling.png under --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

MAIN = ["dense_lora", "loramoe_sft", "self_moe", "upit_lora", "dense_sft", "upcycle_sft", "upcycle_pt", "btx", "upit_ffn",
        "drop_upcycling", "nvidia_granular"]
ABLATIONS = ["ablation_no_router_init", "ablation_random_buckets", "ablation_random_parents", "ablation_no_expansion",
             "ablation_first_half"]
PAPER = {  # averages over the paper's benchmarks (SPEC section 1), for the comparison paragraph
    "dense_lora": 47.53, "loramoe_sft": 49.99, "upit_lora": 52.21, "dense_sft": 31.31, "upcycle_sft": 37.60,
    "upit_ffn": 38.88, "self_moe": 49.30, "ablation_no_router_init": 49.96, "ablation_random_buckets": 49.30, "ablation_first_half": 51.37,
}


def run_one(recipe: str, seed: int, out: Path, overrides: list[str]) -> dict:
    from upcycle.config import load_config
    from upcycle.pipeline import RunConfig, run

    cfg = load_config(RunConfig, ROOT / "recipes" / f"{recipe}.yaml",
                      [f"out={out}", f"seed={seed}", f"data.suite.seed={seed}", *overrides])
    done = out / "results.json"
    if done.is_file():
        return json.loads(done.read_text())
    t0 = time.perf_counter()
    result = run(cfg, progress=False)
    print(f"  {recipe:26s} seed {seed}: average {100 * result['average']:.1f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return result


def mean_std(values: list[float]) -> str:
    m = statistics.mean(values)
    s = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * m:.1f} ± {100 * s:.1f}"


def table(results: dict[str, list[dict]], names: list[str]) -> str:
    from upcycle.suite.tasks import DOMAINS

    lines = ["| method | " + " | ".join(DOMAINS) + " | average |", "|" + " --- |" * (len(DOMAINS) + 2)]
    for name in names:
        runs = results.get(name)
        if not runs:
            continue
        cells = [mean_std([r["scores"][d] for r in runs]) for d in DOMAINS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {mean_std([r['average'] for r in runs])} |")
    return "\n".join(lines)


def plot_curve(points: dict[str, list[tuple[float, float]]], xlabel: str, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in points.items():
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], "o-", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("suite average (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "reproduction"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--train-per-domain", type=int, default=100)
    ap.add_argument("--eval-items", type=int, default=25, help="suite test items per domain")
    ap.add_argument("--data-scaling", type=int, nargs="*", default=[50, 200], help="extra train-per-domain sizes")
    ap.add_argument("--expert-scaling", type=int, nargs="*", default=[4, 16], help="extra UpIT expert counts")
    ap.add_argument("--recipes", nargs="*", default=MAIN + ABLATIONS)
    args = ap.parse_args()
    out = Path(args.out)
    size = [f"data.suite.train_per_domain={args.train_per_domain}", f"eval_max_items={args.eval_items}"]
    started = time.perf_counter()
    results: dict[str, list[dict]] = {}
    for recipe in args.recipes:
        for seed in args.seeds:
            results.setdefault(recipe, []).append(run_one(recipe, seed, out / recipe / f"seed{seed}", size))

    data_points = {"upit_lora": [], "loramoe_sft": []}
    for recipe in data_points:
        for n in sorted({args.train_per_domain, *args.data_scaling}):
            res = results[recipe][0] if n == args.train_per_domain else run_one(
                recipe, args.seeds[0], out / "data_scaling" / f"{recipe}-{n}",
                [f"data.suite.train_per_domain={n}", f"eval_max_items={args.eval_items}"])
            data_points[recipe].append((4 * n * 0.95, res["average"]))  # training samples (5% held out for eval loss)
    plot_curve(data_points, "training samples", out / "data_scaling.png", "Data scaling (seed %d)" % args.seeds[0])

    expert_points = {"upit_lora": []}
    for n in sorted({8, *args.expert_scaling}):
        res = results["upit_lora"][0] if n == 8 else run_one(
            "upit_lora", args.seeds[0], out / "expert_scaling" / f"experts-{n}",
            size + [f"expand.num_experts={n}", f"post_train.moe.num_experts={n}"])
        expert_points["upit_lora"].append((n, res["average"]))
    plot_curve(expert_points, "experts", out / "expert_scaling.png", "Expert scaling, UpIT LoRA (seed %d)" % args.seeds[0])

    wall = time.perf_counter() - started
    text = (f"Built-in suite, {args.train_per_domain} training items per domain, {args.eval_items} test items per domain, "
            f"seeds {args.seeds}; mean ± std (%).\n\n### Main comparison\n\n"
            + table(results, [r for r in MAIN if r in results]) + "\n\n### Ablations (UpIT LoRA-based)\n\n"
            + table(results, ["upit_lora"] + [r for r in ABLATIONS if r in results])
            + f"\n\nWall time of this invocation: {wall / 60:.0f} min (runs already done are skipped).\n")
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"results": results, "data_scaling": data_points,
                                                  "expert_scaling": expert_points, "args": vars(args)}, indent=1, default=str))
    print(text)


if __name__ == "__main__":
    main()
