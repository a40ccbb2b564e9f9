"""The training-step pieces the stages share: the HF Trainer subclass every stage trains with
(`make_trainer_class`: upcycle's learning-rate schedule; for the MoE stages (route, mix's
router_init: ppl, post_train) a loss given as a function), which parameters train
(`set_trainable`), and the padded batch for forward passes outside the Trainer (`pad_batch`; the
Trainer's own batches come from upcycle/data/dataset.py's `Collator`).

It is its own module so that no stage imports these from another stage; train/engine.py configures
the Trainer, this module supplies what it trains with.
"""

from __future__ import annotations

import torch

from upcycle.config import TrainSpec
from upcycle.errors import UpcycleError


def pad_batch(samples, pad_id: int):
    """(ids, labels, attention mask) tensors of `samples`, padded on the right to the longest."""
    width = max(len(s.input_ids) for s in samples)
    ids = torch.tensor([s.input_ids + [pad_id] * (width - len(s.input_ids)) for s in samples])
    labels = torch.tensor([s.labels + [-100] * (width - len(s.labels)) for s in samples])
    mask = torch.tensor([[1] * len(s.input_ids) + [0] * (width - len(s.input_ids)) for s in samples])
    return ids, labels, mask


def make_trainer_class(train: TrainSpec, loss_fn=None):
    """The HF Trainer a stage trains with, on upcycle's learning-rate schedule (train/schedule.py:
    warmup never at rate 0, an optional longer horizon). With `loss_fn`, the MoE stages' Trainer:
    the loss is `loss_fn(model, inputs)`, a NaN stops with the step named, and checkpoints hold the
    trained tensors only."""
    from transformers import Trainer

    from upcycle.train.schedule import make_scheduler

    class ScheduledTrainer(Trainer):
        def create_scheduler(self, num_training_steps: int, optimizer=None):
            if self.lr_scheduler is None:
                self.lr_scheduler = make_scheduler(optimizer or self.optimizer, train.scheduler, train.warmup_ratio,
                                                   num_training_steps, train.epochs, train.schedule_epochs)
                self._created_lr_scheduler = True
            return self.lr_scheduler

    if loss_fn is None:
        return ScheduledTrainer

    class LossTrainer(ScheduledTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = loss_fn(model, dict(inputs))
            if model.training and not torch.isfinite(loss):  # an eval NaN is only reported (eval_loss)
                raise UpcycleError(f"loss is {loss.item()} at step {self.state.global_step + 1}; training stopped. "
                                   "The last listed checkpoint is kept: lower train.lr or check the data, then rerun to resume")
            return (loss, {"loss": loss}) if return_outputs else loss

        def _trained_names(self) -> set[str]:
            model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
            return {name for name, p in model.named_parameters() if p.requires_grad}

        def _save(self, output_dir=None, state_dict=None):
            """A checkpoint holds the trained tensors only (routers, LoRA or expert weights): the frozen
            rest is what the stage rebuilds from its inputs on a rerun, so storing it again per
            checkpoint only costs disk and hashing (SmolLM2's router pre-training wrote 636 MB per
            epoch for 0.1 MB of routers; at 8B with full experts it would be the whole MoE).
            DeepSpeed and FSDP save their own sharded states, unchanged."""
            if state_dict is None and not (self.is_deepspeed_enabled or self.is_fsdp_enabled):
                trained = self._trained_names()
                model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
                state_dict = {k: v for k, v in model.state_dict().items() if k in trained}
            super()._save(output_dir, state_dict=state_dict)

        def _issue_warnings_after_load(self, load_result) -> None:
            """Resuming from a trained-tensors-only checkpoint: frozen weights are expected to be
            missing; a trained one missing, or an unknown one, means the checkpoint is not this model's."""
            trained = self._trained_names()
            wrong = [k for k in load_result.missing_keys if k in trained] + list(load_result.unexpected_keys)
            if wrong:
                raise UpcycleError(f"checkpoint does not fit this model: {len(wrong)} trained tensors missing or "
                                   f"unknown (e.g. {wrong[:3]}); delete the stage folder's checkpoints and rerun")

    return LossTrainer


def set_trainable(model, which: str) -> int:
    """Freeze everything except the routers (and the expert weights): returns the trainable count."""
    from upcycle.moe.model import moe_blocks

    for p in model.parameters():
        p.requires_grad_(False)
    for _, block in moe_blocks(model):
        block.router.weight.requires_grad_(True)
        if which in ("routers_and_experts", "experts_and_routers"):
            lora = getattr(block.experts, "lora_A", None)
            params = list(block.experts.lora_A.parameters()) + list(block.experts.lora_B.parameters()) if lora is not None \
                else [block.experts.gate_proj, block.experts.up_proj, block.experts.down_proj]
            for p in params:
                p.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

