"""The dense model a training stage starts from: the base folder checked before anything is
written (`check_base`) and the model loaded for stage-1 training (`load_model`: full or LoRA).

It is its own module because more than one component needs it: `prepare` trains with it, `branch`
checks its base with it, and eval/checkpoints.py reloads LoRA checkpoints through it (which used
to make eval and the prepare stage import each other).
"""

from __future__ import annotations

from pathlib import Path

import torch

from upcycle.models import ModelRef, model_ref
from upcycle.config import PrepareConfig
from upcycle.errors import UpcycleError
from upcycle.io.model_folder import ModelFolder
from upcycle.moe.model import check_supported


def check_base(cfg_base: str) -> ModelRef:
    """The base a training stage starts from, resolved (a folder, bundled:NAME or a hub id) and checked."""
    ref = model_ref(cfg_base, "base")
    base = ref.path
    ModelFolder(base)  # config.json and safetensors headers checked (no weights read)
    from transformers import AutoConfig

    check_supported(AutoConfig.from_pretrained(base))
    if not any((base / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise UpcycleError(f"base {base}: no tokenizer (tokenizer.json / tokenizer.model); copy the tokenizer files "
                           "of the model it came from into the folder")
    return ref


def load_model(base: Path, cfg: PrepareConfig):
    """The dense model to train: full mode trains every weight, so it is loaded in fp32 (the master
    weights; the Trainer's autocast computes in train.precision); LoRA mode holds the frozen base in
    the compute dtype, and peft keeps the adapters in fp32."""
    from transformers import AutoModelForCausalLM, set_seed

    from upcycle.train.engine import apply_lora, compute_dtype

    dtype = torch.float32 if cfg.mode == "full" else compute_dtype(cfg.train)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, use_safetensors=True)
    if cfg.mode == "lora":
        set_seed(cfg.seed)  # peft draws LoRA A from torch's global RNG: seed it for determinism
        model = apply_lora(model, cfg.lora)
    return model
