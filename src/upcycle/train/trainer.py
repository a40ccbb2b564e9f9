"""The training-step pieces the MoE stages share (route, mix's router_init: ppl, post_train): the
HF Trainer subclass whose loss is a given function (`make_trainer_class`), which parameters train
(`set_trainable`), and the padded batch for forward passes outside the Trainer (`pad_batch`; the
Trainer's own batches come from upcycle/data/dataset.py's `Collator`).

It is its own module so that no stage imports these from another stage; train/engine.py configures
the Trainer, this module supplies what it trains with.
"""

from __future__ import annotations

import torch

from upcycle.errors import UpcycleError


def pad_batch(samples, pad_id: int):
    """(ids, labels, attention mask) tensors of `samples`, padded on the right to the longest."""
    width = max(len(s.input_ids) for s in samples)
    ids = torch.tensor([s.input_ids + [pad_id] * (width - len(s.input_ids)) for s in samples])
    labels = torch.tensor([s.labels + [-100] * (width - len(s.labels)) for s in samples])
    mask = torch.tensor([[1] * len(s.input_ids) + [0] * (width - len(s.input_ids)) for s in samples])
    return ids, labels, mask


def make_trainer_class(loss_fn):
    """An HF Trainer whose loss is `loss_fn(model, inputs)`, stopping with the step named on a NaN."""
    from transformers import Trainer

    class LossTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = loss_fn(model, dict(inputs))
            if model.training and not torch.isfinite(loss):  # an eval NaN is only reported (eval_loss)
                raise UpcycleError(f"loss is {loss.item()} at step {self.state.global_step + 1}; training stopped. "
                                   "The last listed checkpoint is kept: lower train.lr or check the data, then rerun to resume")
            return (loss, {"loss": loss}) if return_outputs else loss

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

