"""Benchmark: `upcycle prepare` throughput against a plain HF Trainer run on the same model and data.

    .venv/bin/python bench/bench_prepare.py [--base bundled:suite-base] [--mode lora] [--repeats 3]

Both runs train the same encoded data with the same TrainingArguments and save the same number
of checkpoints; `prepare` adds its callback (fractional-epoch saves, manifest, content hashes).
The figure is train tokens per second of the training phase (data loading and model building
excluded), best of --repeats, and the ratio between the two. Goal (issue 3): overhead <= 5 %.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="bundled:suite-base")
    ap.add_argument("--mode", default="lora", choices=["lora", "full"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--epochs", type=float, default=1.0)
    args = ap.parse_args()

    from transformers import AutoTokenizer, Trainer
    from transformers.trainer_callback import PrinterCallback

    from upcycle.config import PrepareConfig

    from upcycle.config_io import load_config
    from upcycle.data.build import build_datasets
    from upcycle.data.dataset import Collator
    from upcycle.stages import prepare
    from upcycle.train.checkpoints import make_recorder
    from upcycle.train.dense import check_base, load_model
    from upcycle.train.engine import training_arguments

    work = Path(tempfile.mkdtemp(prefix="bench-prepare-", dir=ROOT / "bench"))
    try:
        cfg = load_config(PrepareConfig, None, [
            f"base={args.base}", f"out={work / 'prepare'}", f"mode={args.mode}", "data.eval_fraction=0", "evaluate=false",
            f"train.epochs={args.epochs}", "save_every=0.25", "train.batch_size=8", "train.logging_steps=10", "force=true"])
        base = check_base(cfg.base)
        tokenizer = AutoTokenizer.from_pretrained(base)
        data = build_datasets(cfg.data, tokenizer, cfg.seed)
        tokens = data.train_report.tokens * cfg.train.epochs

        def plain_run() -> float:
            model = load_model(base, cfg)
            steps = -(-len(data.train) // cfg.train.batch_size)
            targs = training_arguments(cfg.train, work / "plain", cfg.seed, progress=False,
                                       save_strategy="steps", save_steps=max(1, round(steps * cfg.save_every)))
            trainer = Trainer(model=model, args=targs, train_dataset=data.train, data_collator=Collator(tokenizer.pad_token_id))
            trainer.remove_callback(PrinterCallback)
            start = time.perf_counter()
            trainer.train()
            seconds = time.perf_counter() - start
            shutil.rmtree(work / "plain", ignore_errors=True)
            return seconds

        def upcycle_run() -> float:
            # Same work as prepare.run minus data/model building, which the plain run also leaves out.
            from upcycle.manifest import Manifest
            from upcycle.config_io import config_hash

            shutil.rmtree(work / "prepare", ignore_errors=True)
            manifest = Manifest.open(work / "prepare", "prepare", config_hash(cfg), force=True)
            model = load_model(base, cfg)
            targs = training_arguments(cfg.train, work / "prepare" / prepare.CHECKPOINTS, cfg.seed, progress=False)
            trainer = Trainer(model=model, args=targs, train_dataset=data.train, data_collator=Collator(tokenizer.pad_token_id),
                              callbacks=[make_recorder(manifest, cfg.train.epochs, cfg.save_every, cfg.keep_optimizer_states, has_eval=False)])
            trainer.remove_callback(PrinterCallback)
            start = time.perf_counter()
            trainer.train()
            seconds = time.perf_counter() - start
            assert len(manifest.checkpoints) == round(cfg.train.epochs / cfg.save_every)
            return seconds

        results = {"plain HF Trainer": [], "upcycle prepare": []}
        for _ in range(args.repeats):  # interleaved, so drift on a noisy machine hits both alike
            results["plain HF Trainer"].append(plain_run())
            results["upcycle prepare"].append(upcycle_run())
        best = {k: min(v) for k, v in results.items()}
        print(f"model {base.name} ({args.mode}), {data.train_report.samples} samples, {int(tokens)} train tokens, "
              f"{round(cfg.train.epochs / cfg.save_every)} checkpoints")
        for name, seconds in best.items():
            runs = ", ".join(f"{s:.1f}s" for s in results[name])
            print(f"{name:18s} {tokens / seconds:9.0f} tokens/s  (best {seconds:.1f}s; runs {runs})")
        overhead = best["upcycle prepare"] / best["plain HF Trainer"] - 1
        print(f"overhead of prepare: {100 * overhead:+.1f} %  (goal <= 5 %: {'met' if overhead <= 0.05 else 'NOT met'})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
