"""Devices and precision: where a stage's tensors live, and in which dtype its weights are held.

Device rule: every tensor a stage makes for a model goes to that model's device
(`to_model_device`); a model a stage runs outside the Trainer goes to `accelerator()` first.

Precision rule (`train.precision`, resolved in train/engine.py), the Trainer's own mixed precision:
    weights a stage only reads     held in the compute dtype (bf16 / fp16 / fp32)
    weights a stage trains         fp32 master copies while training (`fp32_master_weights`),
                                   cast back to the compute dtype afterwards (`cast_parameters`)
    compute                        the Trainer's autocast (TrainingArguments bf16/fp16)
    router logits, softmax, losses fp32 always (moe/router.py, transformers' loss, routing/scoring.py, routing/loss.py)
fp32 (the CPU default) changes nothing: every weight stays fp32, no autocast.
"""

from __future__ import annotations

import os

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def accelerator() -> torch.device:
    """This process's accelerator (cuda:LOCAL_RANK under torchrun), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def to_model_device(batch, model):
    """`batch` (a tensor, or a dict / list / tuple / BatchEncoding of them) on the model's device.
    Only the device changes: token ids stay integers whatever dtype the weights have."""
    device = model_device(model)
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_model_device(b, model) for b in batch)
    if hasattr(batch, "items"):
        return {k: to_model_device(v, model) for k, v in batch.items()}
    return batch


def fp32_master_weights(model) -> None:
    """Trainable parameters to fp32 (the optimizer's master copies); frozen ones keep their dtype."""
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()


def cast_parameters(model, dtype: torch.dtype) -> None:
    """Every floating parameter to `dtype` (buffers such as rotary frequencies keep theirs)."""
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


def device_generator(device: torch.device, seed: int, *names: object) -> torch.Generator:
    """A generator on `device` seeded from (seed, *names), as upcycle.seeding.generator is on the CPU.
    On the CPU the two are the same stream; a CUDA generator (Philox) draws other numbers from the
    same seed, deterministic on CUDA but not equal to the CPU's."""
    from upcycle.seeding import derive_seed

    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(seed, *names))
    return g
