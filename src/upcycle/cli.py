"""The `upcycle` command line: parse, load and validate the config, call a stage's run().

    upcycle build --base DENSE_DIR --out OUT_DIR --num-experts 8 --top-k 2 --init copy
    upcycle build --config build.yaml moe.top_k=4 export.format=qwen2_moe
    upcycle validate build.yaml
    upcycle demo

Bad input ends with one line per problem on stderr (`upcycle: error: ...`) and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from upcycle.config import BuildConfig, ExpandConfig, MergeConfig, PrepareConfig, load_config
from upcycle.errors import UpcycleError

# CLI flag -> config key; flags are shortcuts for `key=value` overrides.
BUILD_FLAGS = {
    "base": "base", "out": "out", "seed": "seed", "num_experts": "moe.num_experts", "top_k": "moe.top_k",
    "router": "moe.routing", "granularity": "moe.granularity", "expert_type": "moe.expert_type",
    "init": "init.method", "weight_scaling": "init.weight_scaling", "format": "export.format",
    "dtype": "export.dtype", "force": "force", "allow_pickle": "allow_pickle",
}


PREPARE_FLAGS = {"base": "base", "out": "out", "seed": "seed", "mode": "mode", "data": "data.train",
                 "epochs": "train.epochs", "save_every": "save_every", "force": "force"}


EXPAND_FLAGS = {"prepare": "prepare", "out": "out", "num_experts": "num_experts", "seed": "seed", "force": "force"}


def _flag_values(args: argparse.Namespace, flags: dict[str, str]) -> dict:
    from upcycle.config import set_dotted

    values: dict = {}
    for attr, key in flags.items():
        v = getattr(args, attr, None)
        if v is not None and v is not False:
            set_dotted(values, key, v)
    return values


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="upcycle", description="Turn a dense Hugging Face LM into a Mixture-of-Experts.")
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="one-shot dense -> MoE conversion (sparse/granular/drop upcycling)")
    b.add_argument("--config", help="YAML config (flags and key=value overrides win over it)")
    b.add_argument("--base", help="dense model folder")
    b.add_argument("--out", help="output folder")
    b.add_argument("--num-experts", type=int, dest="num_experts")
    b.add_argument("--top-k", type=int, dest="top_k")
    b.add_argument("--router", choices=["softmax_topk", "softmax_topk_renorm", "topk_softmax"])
    b.add_argument("--granularity", type=int)
    b.add_argument("--expert-type", choices=["mlp", "lora"], dest="expert_type")
    b.add_argument("--init", choices=["copy", "virtual_group", "drop", "noise"])
    b.add_argument("--weight-scaling", choices=["none", "nvidia", "output"], dest="weight_scaling")
    b.add_argument("--format", choices=["auto", "mixtral", "qwen2_moe", "qwen3_moe", "upcycle"])
    b.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    b.add_argument("--seed", type=int)
    b.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    b.add_argument("--allow-pickle", action="store_true", dest="allow_pickle",
                   help="read .bin weights with torch.load(weights_only=True) when no safetensors exist")
    b.add_argument("--json", action="store_true", help="print the summary as JSON")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    b.add_argument("overrides", nargs="*", help="key=value overrides, e.g. moe.router_init_std=0.01")

    pr = sub.add_parser("prepare", help="UpIT stage 1: instruction-tune and keep checkpoints as experts")
    pr.add_argument("--config")
    pr.add_argument("--base", help="dense model folder or bundled:suite-base / bundled:smollm2")
    pr.add_argument("--out")
    pr.add_argument("--mode", choices=["lora", "full"])
    pr.add_argument("--data", nargs="+", help="training data files, or 'suite'")
    pr.add_argument("--epochs", type=float)
    pr.add_argument("--save-every", type=float, dest="save_every")
    pr.add_argument("--seed", type=int)
    pr.add_argument("--force", action="store_true")
    pr.add_argument("--quiet", action="store_true")
    pr.add_argument("overrides", nargs="*")

    ex = sub.add_parser("expand", help="UpIT stage 2: grow the checkpoints into N experts (genetic DARE merging)")
    ex.add_argument("--config")
    ex.add_argument("--prepare", help="the prepare stage's output folder")
    ex.add_argument("--out")
    ex.add_argument("--num-experts", type=int, dest="num_experts")
    ex.add_argument("--seed", type=int)
    ex.add_argument("--force", action="store_true")
    ex.add_argument("--quiet", action="store_true")
    ex.add_argument("overrides", nargs="*")

    mg = sub.add_parser("merge", help="merge checkpoints (linear, task_arithmetic, ties, dare, dare_ties), streaming")
    mg.add_argument("config")
    mg.add_argument("--force", action="store_true")
    mg.add_argument("--quiet", action="store_true")
    mg.add_argument("overrides", nargs="*")

    v = sub.add_parser("validate", help="check a config file (and the base folder's config and headers)")
    v.add_argument("config")
    v.add_argument("overrides", nargs="*")

    d = sub.add_parser("demo", help="upcycle the bundled SmolLM2-135M-Instruct and chat with the result")
    d.add_argument("--workdir", default="runs/demo", help="where the demo writes its outputs")
    d.add_argument("--num-experts", type=int, default=8, dest="num_experts")
    d.add_argument("--top-k", type=int, default=2, dest="top_k")
    d.add_argument("--init", default="copy", choices=["copy", "virtual_group", "drop", "noise"])
    return p


def _print_build_summary(s: dict) -> None:
    params = s["parameters"]
    print(f"wrote {s['out']} as {s['format']}: {s['experts']} experts, top-{s['top_k']} ({s['routing']}), "
          f"granularity {s['granularity']}, init {s['init']}, {s['moe_layers']} MoE layers")
    print(f"parameters: dense {s['dense_parameters'] / 1e6:.1f}M -> MoE {params['total'] / 1e6:.1f}M total, "
          f"{params['active'] / 1e6:.1f}M active per token")
    print(f"{s['tensors']} tensors, {s['bytes'] / 1e9:.2f} GB in {len(s['files'])} file(s); "
          f"{s['seconds']:.1f}s, peak RSS {s['peak_rss_mb']:.0f} MB")


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "build":
            from upcycle.stages import build

            cfg = load_config(BuildConfig, args.config, args.overrides, _flag_values(args, BUILD_FLAGS))
            summary = build.run(cfg, progress=not args.quiet)
            print(json.dumps(summary, indent=2, default=str)) if args.json else _print_build_summary(summary)
        elif args.command == "prepare":
            from upcycle.stages import prepare

            cfg = load_config(PrepareConfig, args.config, args.overrides, _flag_values(args, PREPARE_FLAGS))
            summary = prepare.run(cfg, progress=not args.quiet)
            if summary.get("rank", 0) == 0:
                print(f"prepare: {summary['checkpoints']} checkpoints in {summary['out']}")
        elif args.command == "expand":
            from upcycle.stages import expand

            cfg = load_config(ExpandConfig, args.config, args.overrides, _flag_values(args, EXPAND_FLAGS))
            s = expand.run(cfg, progress=not args.quiet)
            print(f"expand: {s['experts']} experts ({s['children']} children) in {s['out']}")
        elif args.command == "merge":
            from upcycle.stages import merge

            cfg = load_config(MergeConfig, args.config, args.overrides, {"force": True} if args.force else None)
            s = merge.run(cfg, progress=not args.quiet)
            print(f"merged {len(cfg.models)} models with {s['method']} into {s['out']} ({s['tensors']} tensors, {s['seconds']:.1f}s)")
        elif args.command == "validate":
            from upcycle.stages import build

            cfg = load_config(BuildConfig, args.config, args.overrides)
            plan = build.BuildPlan(cfg)
            from upcycle.export.save import format_name

            print(f"{args.config}: ok (base {plan.folder.model_type}, {len(plan.moe_layers)} MoE layers, "
                  f"format {format_name(plan.target)})")
        elif args.command == "demo":
            from upcycle import demo

            demo.run(args)
    except UpcycleError as e:
        for problem in e.problems:
            print(f"upcycle: error: {problem}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("upcycle: interrupted; no partial output was kept", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
