"""Checkpoints at fractional epochs, listed in the stage manifest only once complete on disk.

The HF Trainer saves (model, optimizer, scheduler, RNG, data position); this callback decides
*when* (every `save_every` epochs, which the Trainer cannot express) and records each checkpoint
after the Trainer has finished writing it, with its content hash and losses. On rerun, folders
not in the manifest (a kill mid-save) are removed and training resumes from the last listed one.

Hashing a checkpoint (gigabytes at 8B) does not stall training: a worker thread hashes it and then
lists it, one checkpoint at a time in save order, while training goes on; the end of training (and
a stop for non-finite weights) waits for it. A kill before a checkpoint is listed only means
resuming from the one before it.
"""

from __future__ import annotations

import json
import shutil
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from upcycle.errors import UpcycleError
from upcycle.manifest import Manifest, sha256_files
from upcycle.train.engine import save_points, steps_per_epoch

RESUME_ONLY_FILES = ("optimizer.pt", "scheduler.pt", "scaler.pt")


def weight_files(ckpt: Path) -> list[Path]:
    files = sorted(ckpt.glob("*.safetensors"))
    if not files:
        raise UpcycleError(f"{ckpt}: no safetensors weights")
    return files


def make_recorder(manifest: Manifest, epochs: float, save_every: float, keep_optimizer_states: str, has_eval: bool):
    """A TrainerCallback that saves at fractional epochs and lists each checkpoint once it is complete."""
    from transformers import TrainerCallback

    class CheckpointRecorder(TrainerCallback):
        def __init__(self):
            self.points: list[int] = []
            self.loss_sum, self.loss_steps, self.last_logged_step = 0.0, 0, 0
            self.eval_loss = None
            self.hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-sha256")
            self.pending: list[Future] = []
            self.lock = threading.Lock()  # the worker lists while the main thread may save the manifest

        def list_when_hashed(self, entry: dict, files: list[Path]) -> None:
            """Worker: hash the checkpoint's weights, then list it (and drop the previous one's optimizer states)."""
            entry["sha256"] = sha256_files(files)
            with self.lock:
                previous = manifest.checkpoints[-1] if manifest.checkpoints else None
                manifest.add_checkpoint({"index": len(manifest.checkpoints), **entry})
            if previous and keep_optimizer_states == "last":
                for name in RESUME_ONLY_FILES:
                    (manifest.folder / previous["path"] / name).unlink(missing_ok=True)

        def wait_listed(self) -> None:
            """Block until every saved checkpoint is hashed and listed; a worker error is raised here."""
            pending, self.pending = self.pending, []
            for future in pending:
                future.result()

        def on_train_begin(self, args, state, control, train_dataloader=None, model=None, **kw):
            per_epoch = steps_per_epoch(len(train_dataloader), args.gradient_accumulation_steps)
            self.points = save_points(per_epoch, epochs, save_every)
            if len(set(self.points)) != len(self.points) or self.points[0] < 1:
                raise UpcycleError(
                    f"save_every: {save_every} epochs is less than one optimizer step ({per_epoch} steps per epoch); "
                    "use a smaller train.batch_size / grad_accum or a larger save_every")
            if state.is_world_process_zero:
                with self.lock:
                    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad) \
                        if model is not None else None  # ds_numel: a ZeRO-3 partitioned parameter's full size
                    manifest.data.update(planned=len(self.points), steps_per_epoch=per_epoch, save_steps=self.points,
                                         trainable_parameters=trainable)
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

        def on_save(self, args, state, control, model=None, **kw):
            if not state.is_world_process_zero:
                return
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if model is not None and not all(torch.isfinite(p).all() for p in model.parameters() if p.is_floating_point()):
                shutil.rmtree(ckpt, ignore_errors=True)  # never list weights one cannot resume from
                self.wait_listed()
                last = manifest.checkpoints[-1]["path"] if manifest.checkpoints else "none"
                raise UpcycleError(f"weights are not finite after step {state.global_step}; training stopped. "
                                   f"Last good checkpoint: {last}. Lower train.lr or check the data, then rerun to resume")
            entry = {
                "step": state.global_step, "epoch": round(state.epoch, 4), "path": str(ckpt.relative_to(manifest.folder)),
                "train_loss": self.loss_sum / self.loss_steps if self.loss_steps else None, "eval_loss": self.eval_loss,
            }
            self.pending.append(self.hasher.submit(self.list_when_hashed, entry, weight_files(ckpt)))
            self.loss_sum, self.loss_steps, self.eval_loss = 0.0, 0, None

        def on_train_end(self, args, state, control, **kw):
            self.wait_listed()
            if state.is_world_process_zero:
                with self.lock:
                    manifest.data["optimizer_steps"] = state.global_step
                    manifest.save()
                write_loss_curve(manifest, state.log_history)

    return CheckpointRecorder()


LOSS_HISTORY, LOSS_PLOT = "loss_history.json", "loss.png"


def write_loss_curve(manifest: Manifest, log_history: list[dict]) -> None:
    """The stage's train and eval loss per logged step (the Trainer's log history, which a resumed run
    carries over from its checkpoint), as JSON and as a plot beside the stage's manifest."""
    from upcycle.eval.plots import plot_loss
    from upcycle.io.atomic import atomic_write_text

    history = [{k: v for k, v in h.items() if k in ("step", "epoch", "loss", "eval_loss", "learning_rate")}
               for h in log_history if "loss" in h or "eval_loss" in h]
    atomic_write_text(manifest.folder / LOSS_HISTORY, json.dumps(history, indent=1))
    if history:
        plot_loss(history, manifest.folder / LOSS_PLOT, f"{manifest.data['stage']}: loss")


def clean_unlisted_checkpoints(manifest: Manifest, subfolder: str = "checkpoints") -> Path | None:
    """Remove checkpoint folders a kill left half-written; return the last listed one to resume from."""
    listed = {c["path"] for c in manifest.checkpoints}
    folder = manifest.folder / subfolder
    if folder.is_dir():
        for d in folder.glob("checkpoint-*"):  # (runs/: TensorBoard's event files, kept)
            if str(d.relative_to(manifest.folder)) not in listed:
                shutil.rmtree(d, ignore_errors=True)
    if not manifest.checkpoints:
        return None
    last = manifest.folder / manifest.checkpoints[-1]["path"]
    if not (last / "trainer_state.json").is_file():
        raise UpcycleError(f"{last}: listed in the manifest but its trainer state is gone; rerun with --force")
    return last
