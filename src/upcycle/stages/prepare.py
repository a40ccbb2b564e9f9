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

import shutil
import time
from pathlib import Path

import torch

from upcycle.bundled import resolve_model
from upcycle.config import PrepareConfig, config_hash, dump_config
from upcycle.errors import UpcycleError
from upcycle.io.model_folder import ModelFolder
from upcycle.manifest import Manifest, sha256_files
from upcycle.moe.model import check_supported

CHECKPOINTS = "checkpoints"
WEIGHT_FILES = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")
RESUME_ONLY_FILES = ("optimizer.pt", "scheduler.pt", "scaler.pt")


def weight_files(ckpt: Path) -> list[Path]:
    files = sorted(ckpt.glob("*.safetensors"))
    if not files:
        raise UpcycleError(f"{ckpt}: no safetensors weights")
    return files


def check_base(cfg_base: str) -> Path:
    base = resolve_model(cfg_base)
    folder = ModelFolder(base)
    from transformers import AutoConfig

    check_supported(AutoConfig.from_pretrained(base))
    if not any((base / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise UpcycleError(f"base {base}: no tokenizer (tokenizer.json / tokenizer.model); copy the tokenizer files "
                           "of the model it came from into the folder")
    return folder.path


def make_recorder(cfg: PrepareConfig, manifest: Manifest, has_eval: bool):
    """A TrainerCallback that saves at fractional epochs and lists each checkpoint once it is complete."""
    from transformers import TrainerCallback

    from upcycle.train.engine import save_points, steps_per_epoch

    class CheckpointRecorder(TrainerCallback):
        def __init__(self):
            self.points: list[int] = []
            self.loss_sum, self.loss_steps, self.last_logged_step = 0.0, 0, 0
            self.eval_loss = None

        def on_train_begin(self, args, state, control, train_dataloader=None, **kw):
            per_epoch = steps_per_epoch(len(train_dataloader), args.gradient_accumulation_steps)
            self.points = save_points(per_epoch, cfg.train.epochs, cfg.save_every)
            if len(set(self.points)) != len(self.points) or self.points[0] < 1:
                raise UpcycleError(
                    f"save_every: {cfg.save_every} epochs is less than one optimizer step ({per_epoch} steps per epoch); "
                    "use a smaller train.batch_size / grad_accum or a larger save_every")
            if state.is_world_process_zero:
                manifest.data.update(planned=len(self.points), steps_per_epoch=per_epoch, save_steps=self.points)
                manifest.save()
            self.last_logged_step = state.global_step

        def on_step_end(self, args, state, control, **kw):
            if state.global_step in self.points:
                control.should_log = True
                control.should_evaluate = has_eval
                control.should_save = True
            return control

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                steps = state.global_step - self.last_logged_step
                self.loss_sum += float(logs["loss"]) * steps
                self.loss_steps += steps
                self.last_logged_step = state.global_step

        def on_evaluate(self, args, state, control, metrics=None, **kw):
            self.eval_loss = (metrics or {}).get("eval_loss")

        def on_save(self, args, state, control, **kw):
            if not state.is_world_process_zero:
                return
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            entry = {
                "index": len(manifest.checkpoints), "step": state.global_step, "epoch": round(state.epoch, 4),
                "path": str(ckpt.relative_to(manifest.folder)), "sha256": sha256_files(weight_files(ckpt)),
                "train_loss": self.loss_sum / self.loss_steps if self.loss_steps else None, "eval_loss": self.eval_loss,
            }
            previous = manifest.checkpoints[-1] if manifest.checkpoints else None
            manifest.add_checkpoint(entry)
            self.loss_sum, self.loss_steps, self.eval_loss = 0.0, 0, None
            if previous and cfg.keep_optimizer_states == "last":
                for name in RESUME_ONLY_FILES:
                    (manifest.folder / previous["path"] / name).unlink(missing_ok=True)

    return CheckpointRecorder()


def clean_unlisted_checkpoints(manifest: Manifest) -> Path | None:
    """Remove checkpoint folders a kill left half-written; return the last listed one to resume from."""
    listed = {c["path"] for c in manifest.checkpoints}
    folder = manifest.folder / CHECKPOINTS
    if folder.is_dir():
        for d in folder.iterdir():
            if str(d.relative_to(manifest.folder)) not in listed:
                shutil.rmtree(d, ignore_errors=True)
    if not manifest.checkpoints:
        return None
    last = manifest.folder / manifest.checkpoints[-1]["path"]
    if not (last / "trainer_state.json").is_file():
        raise UpcycleError(f"{last}: listed in the manifest but its trainer state is gone; rerun with --force")
    return last


def load_model(base: Path, cfg: PrepareConfig):
    from transformers import AutoModelForCausalLM, set_seed

    from upcycle.train.engine import apply_lora, resolve_precision

    dtype = torch.bfloat16 if resolve_precision(cfg.train) == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, use_safetensors=True)
    if cfg.mode == "lora":
        set_seed(cfg.seed)  # peft draws LoRA A from torch's global RNG: seed it for determinism
        model = apply_lora(model, cfg.lora)
    return model


def run(cfg: PrepareConfig, progress: bool = True) -> dict:
    from transformers import AutoTokenizer, Trainer

    from upcycle.data.build import build_datasets
    from upcycle.data.dataset import Collator
    from upcycle.train.engine import training_arguments

    started = time.perf_counter()
    base = check_base(cfg.base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    data = build_datasets(cfg.data, tokenizer, cfg.seed)  # data errors before anything is written
    out = Path(cfg.out)
    manifest = Manifest.open(out, "prepare", config_hash(cfg), force=cfg.force, initial={"mode": cfg.mode, "base": str(base)})
    if not (out / "upcycle_config.yaml").exists():
        dump_config(cfg, out / "upcycle_config.yaml")
    if progress:
        print(data.summary(), flush=True)

    if not manifest.complete:
        model = load_model(base, cfg)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        args = training_arguments(cfg.train, out / CHECKPOINTS, cfg.seed, packing=cfg.data.packing,
                                  progress=progress)
        recorder = make_recorder(cfg, manifest, has_eval=data.eval is not None)
        trainer = Trainer(model=model, args=args, train_dataset=data.train, eval_dataset=data.eval,
                          data_collator=Collator(pad), callbacks=[recorder])
        if not progress:
            from transformers.trainer_callback import PrinterCallback
            trainer.remove_callback(PrinterCallback)
        resume = clean_unlisted_checkpoints(manifest)
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        if trainer.is_world_process_zero():
            if len(manifest.checkpoints) != manifest.data.get("planned"):
                raise UpcycleError(f"prepare: {len(manifest.checkpoints)} checkpoints saved, {manifest.data.get('planned')} planned")
            manifest.data["complete"] = True
            manifest.data["train_report"] = data.train_report.__dict__
            manifest.save()
        del trainer, model
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return {"out": str(out), "checkpoints": len(manifest.checkpoints), "rank": dist.get_rank()}
    if cfg.evaluate:
        from upcycle.eval.checkpoints import evaluate_checkpoints

        evaluate_checkpoints(manifest, base, cfg, tokenizer, progress=progress)
    return {"out": str(out), "checkpoints": len(manifest.checkpoints), "seconds": time.perf_counter() - started,
            "data": data.summary()}
