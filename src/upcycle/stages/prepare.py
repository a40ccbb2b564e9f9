"""`upcycle prepare`: UpIT stage 1. Instruction-tune the dense model and keep checkpoints as experts.

    upcycle prepare --config prepare.yaml [key=value ...]
    torchrun --standalone --nproc_per_node 2 -m upcycle.cli prepare --config prepare.yaml

The story: check the config, the base folder and the data; train with the HF Trainer; every
`save_every` epochs a checkpoint is saved (LoRA: the adapter; full: the weights) and, once it is
complete on disk, listed in manifest.json with its step, epoch, content hash and losses. Rerun
after a kill, it resumes from the last listed checkpoint. Finally each checkpoint is scored per
domain on the built-in suite (table + plot): the paper's observation that different checkpoints
are best at different tasks.
"""

from __future__ import annotations

import time
from pathlib import Path

from upcycle.config import PrepareConfig, scores_suite

from upcycle.config_io import config_hash, dump_config
from upcycle.errors import UpcycleError
from upcycle.io.atomic import claim_output
from upcycle.manifest import Manifest, stored_path
from upcycle.train.checkpoints import clean_unlisted_checkpoints, make_recorder
from upcycle.train.dense import check_base, load_model

CHECKPOINTS = "checkpoints"


def run(cfg: PrepareConfig, progress: bool = True, anchor: Path | None = None) -> dict:
    """Under torchrun: rank 0 checks the inputs and owns the folder, every rank trains, the
    checkpoints are scored sharded by checkpoint (upcycle/distributed.py). `anchor`: the folder
    the config hash takes paths relative to (config_hash; default: the parent of `out`)."""
    from transformers import AutoTokenizer

    from upcycle import distributed as dist
    from upcycle.data.build import build_datasets
    from upcycle.data.dataset import Collator
    from upcycle.train.engine import training_arguments
    from upcycle.train.trainer import make_trainer_class

    started = time.perf_counter()
    if cfg.base is None or cfg.out is None:
        raise UpcycleError("prepare: base= and out= are required")
    dist.init()
    out = Path(cfg.out)
    ref = dist.rank_zero_first(lambda: check_base(cfg.base))
    base = ref.path
    inputs = [base, *cfg.data.local_files()]
    dist.on_rank_zero_then_wait(lambda: claim_output(out, inputs, cfg.force, resumable=True))  # before loading anything
    tokenizer = AutoTokenizer.from_pretrained(base)
    data = dist.rank_zero_first(lambda: build_datasets(cfg.data, tokenizer, cfg.seed))  # errors before any write

    def open_folder() -> Manifest:
        m = Manifest.open(out, "prepare", config_hash(cfg, anchor=anchor), force=cfg.force, inputs=inputs,
                          initial={"mode": cfg.mode, "base": stored_path(base, out), "base_source": ref.record()})
        if not (out / "upcycle_config.yaml").exists():
            dump_config(cfg, out / "upcycle_config.yaml")
        return m

    manifest = dist.on_rank_zero_then_wait(open_folder)
    if progress and dist.is_main():
        print(data.summary(), flush=True)

    if not manifest.complete:
        model = dist.rank_zero_first(lambda: load_model(base, cfg))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        args = training_arguments(cfg.train, out / CHECKPOINTS, cfg.seed, packing=cfg.data.packing,
                                  progress=progress)
        recorder = make_recorder(manifest, cfg.train.epochs, cfg.save_every, cfg.keep_optimizer_states,
                                 has_eval=data.eval is not None)
        trainer = make_trainer_class(cfg.train)(model=model, args=args, train_dataset=data.train, eval_dataset=data.eval,
                                                data_collator=Collator(pad), callbacks=[recorder])
        if not progress:
            from transformers.trainer_callback import PrinterCallback
            trainer.remove_callback(PrinterCallback)
        resume = dist.on_rank_zero_then_wait(lambda: clean_unlisted_checkpoints(manifest))
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)

        def finish() -> None:  # rank 0 listed the checkpoints
            if len(manifest.checkpoints) != manifest.data.get("planned"):
                raise UpcycleError(f"prepare: {len(manifest.checkpoints)} checkpoints saved, {manifest.data.get('planned')} planned")
            manifest.data["complete"] = True
            manifest.data["train_report"] = data.train_report.__dict__
            manifest.save()

        dist.on_rank_zero_then_wait(finish, share=False)
        manifest.reload()
        del trainer, model
    if scores_suite(cfg.evaluate, cfg.data):
        from upcycle.eval.checkpoints import evaluate_checkpoints

        evaluate_checkpoints(manifest, base, cfg, tokenizer, progress=progress)
    return {"out": str(out), "checkpoints": len(manifest.checkpoints), "seconds": time.perf_counter() - started,
            "model": str(out / manifest.checkpoints[-1]["path"]), "data": data.summary()}
