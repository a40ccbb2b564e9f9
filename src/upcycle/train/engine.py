"""The training engine every stage reuses: the stock HF Trainer, configured from `TrainSpec`.

Nothing here is a training loop. Distribution comes from the launcher (`torchrun`,
`accelerate launch`, DeepSpeed/FSDP options), checkpoints and resumption from the Trainer;
upcycle only adds LoRA through peft and the choice of precision.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from upcycle.config import FSDP_WORDS, LoRATrainSpec, TrainSpec


def resolve_precision(train: TrainSpec) -> str:
    if train.precision != "auto":
        return train.precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def compute_dtype(train: TrainSpec) -> torch.dtype:
    """The dtype weights a stage only reads are held in (see upcycle/devices.py for the whole rule)."""
    from upcycle.devices import DTYPES

    return DTYPES[resolve_precision(train)]


def training_arguments(train: TrainSpec, output_dir: Path, seed: int, *, packing: bool = False,
                       moe: bool = False, progress: bool = True, **overrides):
    """TrainingArguments for a run whose checkpoints are driven by upcycle's callback (save_strategy 'no')."""
    from transformers import TrainingArguments

    precision = resolve_precision(train)
    kwargs = dict(
        output_dir=str(output_dir), num_train_epochs=train.epochs, learning_rate=train.lr,
        lr_scheduler_type=train.scheduler, warmup_steps=train.warmup_ratio, per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=train.batch_size, gradient_accumulation_steps=train.grad_accum,
        weight_decay=train.weight_decay, max_grad_norm=train.max_grad_norm,
        bf16=precision == "bf16", fp16=precision == "fp16",
        activation_checkpointing=train.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if train.gradient_checkpointing else None,
        logging_steps=train.logging_steps, logging_first_step=True, report_to=train.report_to or "none",
        save_strategy="no", eval_strategy="no", seed=seed, data_seed=seed,
        # Packed blocks all have the same length: grouping them by length would only cost time.
        train_sampling_strategy="random" if packing and train.sampler == "group_by_length" else train.sampler,
        remove_unused_columns=False,
        dataloader_num_workers=train.dataloader_workers, use_cpu=not torch.cuda.is_available(),
        # Experts that receive no token in a step have no gradient: DDP must be told to expect that.
        ddp_find_unused_parameters=moe, disable_tqdm=not progress,
        deepspeed=train.deepspeed,
    )
    problems = engine_problems(train)
    if problems:
        from upcycle.errors import UpcycleError
        raise UpcycleError(*problems)
    kwargs.update(fsdp_arguments(train))
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def fsdp_arguments(train: TrainSpec) -> dict:
    """The TrainingArguments that turn FSDP2 on ({} without train.fsdp / train.fsdp_config)."""
    if not train.fsdp and train.fsdp_config is None:
        return {}
    config = {"version": 2}
    for word in (train.fsdp or "full_shard").split():
        config.update(FSDP_WORDS[word])
    return {"fsdp": True, "fsdp_config": {**config, **(train.fsdp_config or {})}}


def engine_problems(train: TrainSpec, gpu: bool | None = None) -> list[str]:
    """Why the configured engine cannot run on this machine (checked before training starts).

    accelerate (1.16, AcceleratorState) selects FSDP only for multi-accelerator runs (MULTI_GPU, NPU,
    XPU, ...): under torchrun on CPU (gloo, MULTI_CPU) it drops the FSDP plugin without a word and
    the Trainer wraps the model in DDP. That silent fallback is refused here. DeepSpeed has a CPU
    accelerator of its own and runs ZeRO-2/3 on CPU (gloo, plus a shm op it compiles on first use).
    """
    gpu = torch.cuda.is_available() if gpu is None else gpu
    if (train.fsdp or train.fsdp_config is not None) and not gpu:
        return [f"train.fsdp={train.fsdp!r}: FSDP needs GPUs; on CPU accelerate would silently train with DDP "
                "instead (it enables FSDP only for multi-GPU runs). Remove train.fsdp/train.fsdp_config here, "
                "or use train.deepspeed (ZeRO-2/3 runs on CPU)"]
    return []


def apply_lora(model, lora: LoRATrainSpec):
    """Wrap a dense model with peft LoRA on `lora.targets`; only the adapters train."""
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in lora.targets if t not in present]
    if missing:
        from upcycle.errors import UpcycleError
        raise UpcycleError(f"lora.targets: {missing} are not modules of this model (it has e.g. gate_proj, q_proj)")
    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.targets),
                        bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def steps_per_epoch(num_batches: int, grad_accum: int) -> int:
    """Optimizer steps in one epoch, as the Trainer counts them."""
    return max(num_batches // grad_accum + int(num_batches % grad_accum > 0), 1)


def save_points(steps_in_epoch: int, epochs: float, save_every: float) -> list[int]:
    """Global steps at which checkpoints k = 1..K are saved, K = epochs / save_every."""
    count = round(epochs / save_every)
    points = [round(k * save_every * steps_in_epoch) for k in range(1, count + 1)]
    total = math.ceil(epochs * steps_in_epoch)
    points[-1] = min(points[-1], total)
    return points
