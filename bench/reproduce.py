"""Reproduce the paper's comparisons: UpIT, the baselines and the ablations at equal data over
several seeds, on the built-in suite base (`--model suite`) or on SmolLM2-135M-Instruct with the
`smol` task mix (`--model smollm2`: the LoRA table, Figure 2, the untuned baseline).

    .venv/bin/python bench/reproduce.py                      # the toy suite base (see README "Results")
    .venv/bin/python bench/reproduce.py --seeds 0 1 2 3 4 --train-per-domain 200 --eval-items 50   # larger
    .venv/bin/python bench/reproduce.py --model smollm2      # the LoRA table on SmolLM2 (sizes: PROFILES)
    .venv/bin/python bench/reproduce.py --model smollm2 --train-per-domain 150 --seeds 0 1 2 3 4   # a GPU

Every run is `upcycle run recipes/<recipe>.yaml` with the seed, the suite size and the output folder
overridden; finished runs are skipped on a rerun (the pipeline's manifests), so an interrupted
reproduction continues. With --model smollm2 the UpIT ablations take over upit_lora's finished
leading stages (prepare, then expand, then route) as long as their configs hash equal: hard-linked
and recorded as done in their run.json, which the pipeline accepts only if the config hash and the
manifest's digest match. Once a run is scored its Trainer checkpoints and post-trained weights are
deleted (--keep-models keeps them). Writes results.md (mean +- std per domain, the paper's layout),
results.json and the plots under --out (smollm2: Figure 2 under --figures too).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

MAIN = ["dense_lora", "loramoe_sft", "self_moe", "upit_lora", "dense_sft", "upcycle_sft", "upcycle_pt", "btx", "upit_ffn",
        "drop_upcycling", "nvidia_granular"]
ABLATIONS = ["ablation_no_router_init", "ablation_random_buckets", "ablation_random_parents", "ablation_no_expansion",
             "ablation_first_half"]
LORA_TABLE = ["dense_lora", "loramoe_sft", "loramoe_sft_2ep", "self_moe", "upit_lora"]
LORA_ABLATIONS = ["ablation_no_router_init", "ablation_random_buckets", "ablation_random_parents", "ablation_first_half",
                  "ablation_no_expansion"]
# Rows that are a recipe with overrides: LoRAMoE_SFT with UpIT's MoE-phase optimizer steps (2 epochs of MoE
# training, as UpIT's post-training) beside the equal-data row (4 epochs).
VARIANTS = {"loramoe_sft_2ep": ("loramoe_sft", ["post_train.train.epochs=2"])}
UNTUNED = "untuned"  # the base model itself, scored on the same test items (no recipe)


@dataclass(frozen=True)
class Profile:
    """A model and the sizes its reproduction runs at; every value can be overridden by a flag."""

    recipes: list[str]
    train_per_domain: int
    eval_items: int | None                      # test items per domain scored (None: all of them)
    data_scaling: list[int]
    expert_scaling: list[int]
    overrides: list[str] = field(default_factory=list)   # for every recipe
    per_recipe: dict[str, list[str]] = field(default_factory=dict)
    untuned: bool = False                       # also score the base model itself
    share_stages: bool = False                  # ablations start from upit_lora's finished stages


# SmolLM2 at 2-core CPU size (README "Results on SmolLM2" gives the time arithmetic): 28 training rows per
# domain (112 rows, 106 after the 5% eval-loss split; 40 overran the 2.5-hour budget), 100 test items per domain;
# LoRA rank 16 on the MLP, batch 8, lr 1e-3 (LoRA stages) -- the recipes' 3e-3 is the toy base's. UpIT as the recipe
# ships it: 8 stage-1 checkpoints (0.25 epoch apart over 2 epochs), the second half (4) DARE-expanded to 8 experts
# (children by DARE on each parent's LoRA factors), seed set 1% of the rows with a floor of 4 per expert, 4 epochs
# of router pre-training. Stage-1 checkpoints are scored (Figure 2) on UpIT's first seed only; elsewhere as
# eval_checkpoints: auto has it (dense_lora scores its last checkpoint, which is the row; UpIT none).
SMOL_LR = "1.0e-3"
PROFILES = {
    "suite": Profile(recipes=MAIN + ABLATIONS, train_per_domain=100, eval_items=25, data_scaling=[50, 200],
                     expert_scaling=[4, 16]),
    "smollm2": Profile(
        recipes=LORA_TABLE + LORA_ABLATIONS, train_per_domain=28, eval_items=None, data_scaling=[], expert_scaling=[],
        overrides=["base=bundled:smollm2", "data.suite.mix=smol", "data.suite.test_per_domain=100",
                   "prepare.train.batch_size=8", f"prepare.train.lr={SMOL_LR}",
                   "post_train.train.batch_size=8", f"post_train.train.lr={SMOL_LR}", "post_train.save_every=2.0",
                   "branch.train.batch_size=8", f"branch.train.lr={SMOL_LR}"],
        per_recipe={"dense_lora": ["prepare.save_every=4.0"],       # only the final model is scored
                    "loramoe_sft": ["post_train.save_every=4.0"]},
        untuned=True, share_stages=True),
}
PAPER = {  # averages over the paper's benchmarks (SPEC section 1), for the comparison paragraph
    "dense_lora": 47.53, "loramoe_sft": 49.99, "upit_lora": 52.21, "dense_sft": 31.31, "upcycle_sft": 37.60,
    "upit_ffn": 38.88, "self_moe": 49.30, "ablation_no_router_init": 49.96, "ablation_random_buckets": 49.30, "ablation_first_half": 51.37,
}


def recipe_config(recipe: str, seed: int, out: Path, overrides: list[str]):
    """The run config of a table row: a recipe, or a VARIANTS row (a recipe with overrides)."""
    from upcycle.config_io import load_config
    from upcycle.pipeline import RunConfig

    recipe, extra = VARIANTS.get(recipe, (recipe, []))
    return load_config(RunConfig, ROOT / "recipes" / f"{recipe}.yaml",
                       [f"out={out}", f"seed={seed}", f"data.suite.seed={seed}", *extra, *overrides])


REPORT_ONLY = False  # --report-only: tabulate the finished runs, start none


def run_one(recipe: str, seed: int, out: Path, overrides: list[str]) -> dict | None:
    from upcycle.pipeline import run

    cfg = recipe_config(recipe, seed, out, overrides)
    done = out / "results.json"
    if done.is_file():
        return json.loads(done.read_text())
    if REPORT_ONLY:
        return None
    t0 = time.perf_counter()
    result = run(cfg, progress=False)
    print(f"  {recipe:26s} seed {seed}: average {100 * result['average']:.1f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return result


SHAREABLE = ("prepare", "expand", "route")  # stages an ablation may take over from upit_lora's run of its seed


def share_stages(source: Path, cfg) -> list[str]:
    """Start `cfg`'s run from the finished leading stages of the run in `source` whose configs hash
    equal (prepare, then expand, then route; the first that differs and every later one run anew):
    hard-link each folder and record the stage done in run.json exactly as the pipeline records it,
    so its own check (status, config hash anchored at each run folder, manifest digest) skips them."""
    from upcycle.config_io import config_hash
    from upcycle.pipeline import RUN_MANIFEST, _stage_digest, stage_configs

    out = Path(cfg.out)
    if (out / RUN_MANIFEST).exists() or not (source / RUN_MANIFEST).is_file():
        return []
    theirs = json.loads((source / RUN_MANIFEST).read_text())["stages"]
    shared = []
    for stage, stage_cfg in stage_configs(cfg).items():
        done = theirs.get(stage) or {}
        if stage not in SHAREABLE or done.get("status") != "done" \
                or done.get("config_hash") != config_hash(stage_cfg, anchor=out) \
                or done.get("manifest_sha256") != _stage_digest(source / stage):
            break
        shared.append(stage)
    if not shared:
        return []
    out.mkdir(parents=True, exist_ok=True)
    for stage in shared:
        shutil.copytree(source / stage, out / stage, copy_function=os.link)
    record = {"recipe": cfg.recipe, "stages": {stage: {**theirs[stage], "shared_from": str(source / stage)}
                                               for stage in shared}}
    (out / RUN_MANIFEST).write_text(json.dumps(record, indent=2))
    return shared


def prune_weights(run_folder: Path, keep_model: bool) -> int:
    """Free the disk a scored run no longer needs (the full SmolLM2 table kept ~2.5 GB per run and
    filled a 250 GB disk): the Trainer checkpoints of post_train (only for resuming it), the mixed
    model that post_train started from, and, unless `keep_model`, the post-trained weights (their
    scores, manifests and model card stay). Stage-1 checkpoints and expert pools stay: ablations start
    from them. Returns the bytes freed."""
    doomed = [run_folder / "post_train" / "checkpoints", *sorted((run_folder / "mix").glob("*/*.safetensors"))]
    if not keep_model:
        doomed += sorted((run_folder / "post_train" / "model").glob("*.safetensors"))
        doomed += sorted((run_folder / "post_train" / "model").glob("*.safetensors.index.json"))
    freed = 0
    for path in doomed:
        if path.is_dir():
            freed += sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            shutil.rmtree(path)
        elif path.is_file():
            freed += path.stat().st_size
            path.unlink()
    return freed


def run_untuned(seed: int, out: Path, overrides: list[str]) -> dict | None:
    """The base model itself on the same test items as the recipes (dense_lora's config names them)."""
    done = out / "results.json"
    if done.is_file():
        return json.loads(done.read_text())
    if REPORT_ONLY:
        return None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from upcycle.models import resolve_model
    from upcycle.eval.checkpoints import suite_test_items
    from upcycle.eval.suite_eval import evaluate_items

    t0 = time.perf_counter()
    cfg = recipe_config("dense_lora", seed, out, overrides)
    base = resolve_model(cfg.base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    result = evaluate_items(model, AutoTokenizer.from_pretrained(base), suite_test_items(cfg.data.suite, cfg.eval_max_items))
    result = {"recipe": UNTUNED, "scores": result["scores"], "average": result["average"], "model": str(base),
              "seconds": time.perf_counter() - t0}
    out.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(result, indent=2))
    print(f"  {UNTUNED:26s} seed {seed}: average {100 * result['average']:.1f} ({result['seconds']:.0f} s)", flush=True)
    return result


def mean_std(values: list[float]) -> str:
    m = statistics.mean(values)
    s = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * m:.1f} ± {100 * s:.1f}"


def table(results: dict[str, list[dict]], names: list[str]) -> str:
    """Mean +- std per domain and on average, with each row's cost: trainable parameters per training
    stage, optimizer steps over all stages, and minutes per run (results.json `cost`)."""
    from upcycle.suite.tasks import DOMAINS

    lines = ["| method | " + " | ".join(DOMAINS) + " | average | seeds | trainable parameters | optimizer steps "
             "| minutes per run |", "|" + " --- |" * (len(DOMAINS) + 6)]
    for name in names:
        runs = results.get(name)
        if not runs:
            continue
        cells = [mean_std([r["scores"][d] for r in runs]) for d in DOMAINS]
        minutes = statistics.mean(r.get("seconds", 0.0) for r in runs) / 60
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {mean_std([r['average'] for r in runs])} | "
                     f"{len(runs)} | {trainable(runs[0])} | {steps(runs[0])} | {minutes:.1f} |")
    return "\n".join(lines)


def trainable(run: dict) -> str:
    cost = run.get("cost") or {}
    parts = [f"{stage} {c['trainable_parameters'] / 1e6:.2f}M" for stage, c in cost.items()
             if c.get("trainable_parameters")]
    return ", ".join(parts) or "-"


def steps(run: dict) -> str:
    cost = run.get("cost") or {}
    per = {stage: c["optimizer_steps"] for stage, c in cost.items() if c.get("optimizer_steps")}
    return f"{sum(per.values())} ({', '.join(f'{s} {n}' for s, n in per.items())})" if per else "-"


def diversity_report(out: Path, recipe: str, seeds: list[int]) -> str:
    """Per seed: the pool's checkpoint task-vector cosine, the children's cosine to the plain mix of their
    parents, the per-sample perplexity spread, the argmin buckets and their entropy, the owner share."""
    lines = ["| seed | checkpoint cosine min / mean / max | children: cosine to mix | ppl spread median | "
             "argmin buckets (entropy) | bucket tokens to owner, top-k before -> after | degenerate |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for seed in seeds:
        folder = out / recipe / f"seed{seed}"
        if not (folder / "route" / "manifest.json").is_file():
            continue
        expand = json.loads((folder / "expand" / "manifest.json").read_text())
        route = json.loads((folder / "route" / "manifest.json").read_text())
        pool, seeds_d = expand["diversity"], route["diversity"]
        mix = [r["cosine_to_mix"] for r in expand["lineage"] if r.get("cosine_to_mix") is not None]
        share = lambda key, which: 100 * statistics.mean(route[key][which])  # noqa: E731
        lines.append(f"| {seed} | {'{min:.4f} / {mean:.4f} / {max:.4f}'.format(**pool['checkpoint_cosine'])} | "
                     f"{statistics.mean(mix):.3f} | {seeds_d['ppl_spread']['median']:.3f} | "
                     f"{seeds_d['argmin_bucket_sizes']} ({seeds_d['argmin_bucket_entropy']:.2f}) | "
                     f"{share('share_before', 'top_k'):.0f}% -> {share('share_after', 'top_k'):.0f}% | "
                     f"{'yes' if pool['degenerate'] or seeds_d['degenerate'] else 'no'} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def learns_check(results: dict[str, list[dict]], tuned: str = "dense_lora") -> str:
    """Issue 14's bar: the LoRA baseline beats the untuned model on every domain by more than 2 std
    (the larger of the two rows' std over seeds)."""
    from upcycle.suite.tasks import DOMAINS

    if not results.get(UNTUNED) or not results.get(tuned):
        return ""
    lines = []
    for d in DOMAINS:
        a, b = ([r["scores"][d] for r in results[row]] for row in (UNTUNED, tuned))
        std = max(statistics.stdev(v) if len(v) > 1 else 0.0 for v in (a, b))
        gap = statistics.mean(b) - statistics.mean(a)
        verdict = "yes" if gap > 2 * std and gap > 0 else "NO"
        lines.append(f"- {d}: {tuned} - {UNTUNED} = {100 * gap:+.1f} points, 2 std = {200 * std:.1f} "
                     f"({len(b)} seed(s)): {verdict}")
    return "\n".join(lines)


def plot_figure2(prepare_folders: list[Path], path: Path) -> None:
    """The paper's Figure 2 at this scale: each stage-1 checkpoint's score per domain (mean and std over
    seeds), the best checkpoint of each domain circled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from upcycle.suite.tasks import DOMAINS

    runs = [json.loads((f / "checkpoint_scores.json").read_text()) for f in prepare_folders
            if (f / "checkpoint_scores.json").is_file()]
    runs = [run for run in runs if len(run) == max(map(len, runs), default=0)]  # seeds that scored every checkpoint
    if not runs:
        return
    epochs = [c["epoch"] for c in runs[0]]
    fig, ax = plt.subplots(figsize=(7, 4))
    for d in DOMAINS:
        per = [[100 * run[i]["scores"][d] for run in runs] for i in range(len(epochs))]
        mean = [statistics.mean(v) for v in per]
        std = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in per]
        line = ax.errorbar(epochs, mean, yerr=std, marker="o", capsize=3, label=d)[0]
        best = max(range(len(mean)), key=mean.__getitem__)
        ax.scatter([epochs[best]], [mean[best]], s=160, facecolors="none", edgecolors=line.get_color(), linewidths=2)
    ax.set_xlabel("epoch of stage-1 checkpoint")
    ax.set_ylabel("score (%)")
    ax.set_title(f"Stage-1 checkpoints per domain, mean ± std over {len(runs)} seed(s) (circle: best)")
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_upit_routing(model_dir: Path, overrides: list[str], seed: int, path: Path) -> None:
    """The routing heatmap of a finished UpIT model: each domain's share of top-k assignments per expert,
    on 20 test prompts + reference answers per domain (eval/routing.py, as the demo draws it)."""
    from transformers import AutoTokenizer

    from upcycle.eval.checkpoints import suite_test_items
    from upcycle.eval.routing import plot_routing, routing_shares, specialization, suite_texts
    from upcycle.export.load import load_moe

    if not model_dir.is_dir():
        return
    spec = recipe_config("upit_lora", seed, model_dir, overrides).data.suite
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    shares = routing_shares(load_moe(model_dir), tokenizer, suite_texts(tokenizer, suite_test_items(spec, 20)))
    plot_routing(shares, path, title=f"UpIT (LoRA) on SmolLM2, seed {seed}: share of each domain's tokens per expert")
    print("routing specialization per domain: " + ", ".join(f"{d} {v:.2f}" for d, v in specialization(shares).items()))


def bucket_report(out: Path, recipes: list[str], seeds: list[int]) -> str:
    """Per recipe and seed: seed samples owned by each expert, and each bucket's domains (route/manifest.json)."""
    lines = []
    for recipe in recipes:
        for seed in seeds:
            manifest = out / recipe / f"seed{seed}" / "route" / "manifest.json"
            if not manifest.is_file():
                continue
            buckets = json.loads(manifest.read_text())["buckets"]
            parts = [f"e{e}: {b['size']} ({', '.join(f'{d} {n}' for d, n in sorted(b['domains'].items())) or '-'})"
                     for e, b in buckets.items()]
            lines.append(f"- {recipe} seed {seed}: " + "; ".join(parts))
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
    ap.add_argument("--model", choices=sorted(PROFILES), default="suite",
                    help="suite: the toy suite base; smollm2: SmolLM2-135M-Instruct on the smol mix (the LoRA table)")
    ap.add_argument("--out", default=None, help="default: bench/results/reproduction[-MODEL]")
    ap.add_argument("--figures", default=None, help="where Figure 2 goes (smollm2; default docs/results/smollm2)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--train-per-domain", type=int, default=None)
    ap.add_argument("--eval-items", type=int, default=None, help="suite test items per domain (default: the profile's)")
    ap.add_argument("--data-scaling", type=int, nargs="*", default=None, help="extra train-per-domain sizes")
    ap.add_argument("--expert-scaling", type=int, nargs="*", default=None, help="extra UpIT expert counts")
    ap.add_argument("--recipes", nargs="*", default=None)
    ap.add_argument("--no-untuned", action="store_true", help="skip scoring the untuned base")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more overrides for every recipe")
    ap.add_argument("--keep-models", action="store_true",
                    help="keep every run's post-trained weights and Trainer checkpoints (default: freed once scored)")
    ap.add_argument("--figure2-seed", default=None,
                    help="the UpIT seed that scores every stage-1 checkpoint for Figure 2 (default: the first of --seeds; "
                    "'none': no Figure 2, e.g. when adding seeds to a table whose Figure 2 exists)")
    ap.add_argument("--report-only", action="store_true",
                    help="write results.md from the runs already finished under --out; start no run")
    args = ap.parse_args()
    prof = PROFILES[args.model]
    for key in ("train_per_domain", "eval_items", "data_scaling", "expert_scaling", "recipes"):
        if getattr(args, key) is None:
            setattr(args, key, getattr(prof, key))
    figure2_seed = None if args.model == "suite" or args.figure2_seed == "none" else (
        args.seeds[0] if args.figure2_seed is None else int(args.figure2_seed))
    suffix = "" if args.model == "suite" else f"-{args.model}"
    out = Path(args.out or ROOT / "bench" / "results" / f"reproduction{suffix}")
    figures = Path(args.figures or ROOT / "docs" / "results" / args.model)
    items = [] if args.eval_items is None else [f"eval_max_items={args.eval_items}"]
    size = [*prof.overrides, f"data.suite.train_per_domain={args.train_per_domain}", *items, *args.set]
    started = time.perf_counter()
    results: dict[str, list[dict]] = {}
    global REPORT_ONLY
    REPORT_ONLY = args.report_only
    if prof.untuned and not args.no_untuned:
        runs = [run_untuned(seed, out / UNTUNED / f"seed{seed}", size) for seed in args.seeds]
        results[UNTUNED] = [r for r in runs if r is not None]
    for recipe in args.recipes:
        for seed in args.seeds:
            figure2 = recipe == "upit_lora" and seed == figure2_seed
            # Figure 2 on the first seed of UpIT; elsewhere eval_checkpoints: auto (stage 1 scored only where it is the row)
            scoring = ["eval_checkpoints=all"] if figure2 else []
            overrides = size + prof.per_recipe.get(recipe, []) + scoring
            folder = out / recipe / f"seed{seed}"
            if prof.share_stages and recipe != "upit_lora" and not REPORT_ONLY:
                shared = share_stages(out / "upit_lora" / f"seed{seed}", recipe_config(recipe, seed, folder, overrides))
                if shared:
                    print(f"  {recipe:26s} seed {seed}: {', '.join(shared)} shared with upit_lora", flush=True)
            result = run_one(recipe, seed, folder, overrides)
            if result is not None and not REPORT_ONLY and not args.keep_models:
                # upit_lora's first seed keeps its model: the routing heatmap is drawn from it
                prune_weights(folder, keep_model=(recipe, seed) == ("upit_lora", args.seeds[0]))
            if result is not None:
                result.setdefault("seed", seed)
                results.setdefault(recipe, []).append(result)
    results = {k: v for k, v in results.items() if v}

    data_points: dict[str, list] = {}
    if args.data_scaling:
        data_points = {"upit_lora": [], "loramoe_sft": []}
        for recipe in data_points:
            for n in sorted({args.train_per_domain, *args.data_scaling}):
                res = results[recipe][0] if n == args.train_per_domain else run_one(
                    recipe, args.seeds[0], out / "data_scaling" / f"{recipe}-{n}",
                    [*prof.overrides, f"data.suite.train_per_domain={n}", *items, *args.set])
                data_points[recipe].append((4 * n * 0.95, res["average"]))  # training samples (5% held out for eval loss)
        plot_curve(data_points, "training samples", out / "data_scaling.png", "Data scaling (seed %d)" % args.seeds[0])

    expert_points: dict[str, list] = {}
    if args.expert_scaling:
        expert_points = {"upit_lora": []}
        for n in sorted({8, *args.expert_scaling}):
            res = results["upit_lora"][0] if n == 8 else run_one(
                "upit_lora", args.seeds[0], out / "expert_scaling" / f"experts-{n}",
                size + [f"expand.num_experts={n}", f"post_train.moe.num_experts={n}"])
            expert_points["upit_lora"].append((n, res["average"]))
        plot_curve(expert_points, "experts", out / "expert_scaling.png", "Expert scaling, UpIT LoRA (seed %d)" % args.seeds[0])

    buckets, diversity, ratio = "", "", ""
    plain = [x for x in results.get("upit_lora", []) if x["seed"] != figure2_seed]  # UpIT runs without Figure 2
    if plain and "loramoe_sft" in results:
        minutes = {"upit_lora": statistics.mean(x.get("seconds", 0.0) for x in plain) / 60,
                   "loramoe_sft": statistics.mean(x.get("seconds", 0.0) for x in results["loramoe_sft"]) / 60}
        ratio = (f"UpIT's wall time against LoRAMoE_SFT's at equal data: {minutes['upit_lora']:.1f} vs "
                 f"{minutes['loramoe_sft']:.1f} min per run, {minutes['upit_lora'] / max(minutes['loramoe_sft'], 1e-9):.2f}x "
                 f"(UpIT over seeds {[x['seed'] for x in plain]}, not the Figure-2 seed, which also scores its 8 stage-1 "
                 "checkpoints; runs resumed from an earlier invocation count with their own time; "
                 "bench/bench_upit_cost.py measures both in one invocation)")
    if args.model != "suite" and "upit_lora" in results:
        diversity = diversity_report(out, "upit_lora", args.seeds)
        if figure2_seed is not None:
            plot_figure2([out / "upit_lora" / f"seed{seed}" / "prepare" for seed in args.seeds], figures / "figure2.png")
        first = results["upit_lora"][0]["seed"]
        plot_upit_routing(out / "upit_lora" / f"seed{first}" / "post_train" / "model", size, first,
                          figures / "routing_upit_lora.png")
        buckets = bucket_report(out, ["upit_lora", "upit_relative_buckets"], args.seeds)

    wall = time.perf_counter() - started
    compute = sum(r.get("seconds", 0.0) for runs in results.values() for r in runs)
    main_rows = [r for r in dict.fromkeys([UNTUNED, *MAIN, *VARIANTS]) if r in results]
    ablation_rows = [r for r in dict.fromkeys(ABLATIONS + LORA_ABLATIONS) if r in results]  # each row once
    check = learns_check(results)
    text = (f"Model {args.model}, {args.train_per_domain} training items per domain, "
            f"{args.eval_items or 'all'} test items per domain, seeds {args.seeds}; mean ± std (%); "
            f"minutes per run as measured (a run whose stage 1 was shared did not pay for it).\n\n"
            f"Overrides for every recipe: `{' '.join(size)}`\n\n### Main comparison\n\n"
            + table(results, main_rows) + "\n\n### Ablations (UpIT LoRA-based)\n\n"
            + table(results, ["upit_lora"] + ablation_rows)
            + (f"\n\n### Does LoRA learn the mix?\n\n{check}" if check else "")
            + (f"\n\n### Seed buckets (route stage)\n\n{buckets}" if buckets else "")
            + (f"\n\n### Diversity of UpIT's expert pool (routing/diversity.py)\n\n{diversity}" if diversity else "")
            + (f"\n\n{ratio}" if ratio else "")
            + f"\n\nCompute of the runs in these tables (sum of their own wall times): {compute / 60:.0f} min. "
            f"Wall time of this invocation: {wall / 60:.0f} min (runs already done are skipped).\n")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"results": results, "data_scaling": data_points,
                                                  "expert_scaling": expert_points, "args": vars(args)}, indent=1, default=str))
    print(text)


if __name__ == "__main__":
    main()
