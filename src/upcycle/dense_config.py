"""A dense config.json, read once the way transformers reads it, and the facts an MoE config must keep.

Most hub checkpoints were written by transformers 4: `rope_theta` and `rope_scaling` at the top
level, `torch_dtype`, and family extras (`use_mrope`, `rope_interleaved`). Copying such keys by
name into an MoE config loses them silently (Mixtral then uses its own default theta). So every
dense config is built into its stock config class first (no remote code) and used as that class's
`to_dict()`: one layout, whatever version wrote the file. What an MoE config must reproduce is
then compared as *facts* of the forward pass (`forward_facts`: RoPE frequencies and scaling, head
size, biases, the sliding window of every layer, norms' epsilon, tied embeddings, special tokens),
computed the way each stock class computes them, for the dense config and for the MoE config built
from it: a format that would change one of them is refused, naming it.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
from pathlib import Path
from typing import Any

import torch
from transformers import CONFIG_MAPPING

from upcycle.architectures import ATTENTION_FORMS, COMMON_CONFIG_KEYS, WINDOW_SPELLING, dense_architecture
from upcycle.errors import UpcycleError
from upcycle.io.user_files import read_json_object

# Sizes the weights are checked against: a default here would silently describe another model.
REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")

ANY = object()
# Keys that hub config.json files carry although no stock dense config class defines them, with the
# value that leaves the model unchanged (ANY: bookkeeping, no effect at any value). Any other key a
# class does not define is refused: upcycle cannot tell whether it changes the model.
HARMLESS_UNKNOWN: dict[str, Any] = {
    "_name_or_path": ANY, "model_type": ANY, "output_attentions": ANY, "_commit_hash": ANY,
    "_attn_implementation_autoset": ANY,
    "is_llama_config": ANY,      # nanotron's marker (SmolLM2)
    "_model_name_or_path": ANY, "unk_token_id": ANY,  # written by transformers' GGUF loader (the bundled SmolLM2)
    "rope_interleaved": False,   # nanotron; True rotates GPT-J style, which no stock class does
    "use_mrope": False,          # Qwen2.5; True is Qwen2-VL's multimodal RoPE
    "sliding_window": None,      # a null window in a family that has none (Llama)
}

# Fields of the stock dense config classes that leave the forward pass unchanged, or are checked
# elsewhere (intermediate_size against the weights, mlp_bias by DenseArchitecture.requires).
NOT_FORWARD_FIELDS = frozenset({
    "transformers_version", "architectures", "output_hidden_states", "return_dict", "dtype", "chunk_size_feed_forward",
    "is_encoder_decoder", "id2label", "label2id", "problem_type", "initializer_range", "use_cache", "pretraining_tp",
    "attention_dropout", "intermediate_size", "mlp_bias",
})
# Fields whose effect `forward_facts` captures.
FACT_FIELDS = frozenset({
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "hidden_act", "rms_norm_eps", "tie_word_embeddings", "max_position_embeddings", "pad_token_id", "bos_token_id",
    "eos_token_id", "rope_parameters", "attention_bias", "sliding_window", "use_sliding_window", "max_window_layers",
    "layer_types",
})


def read_config_json(path: Path) -> dict:
    """The JSON object in `path`, or a one-line UpcycleError naming the file."""
    return read_json_object(path, "model config (config.json)",
                            "config.json must map keys (model_type, hidden_size, ...) to values")


def config_object(cfg: dict, where: str = "config"):
    """The stock config class of cfg["model_type"] built from `cfg` (any layout transformers reads)."""
    model_type = cfg.get("model_type")
    try:
        return CONFIG_MAPPING[model_type].from_dict(copy.deepcopy(cfg))
    except Exception as e:  # noqa: BLE001 - transformers' validation errors are of many types
        reason = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        raise UpcycleError(f"{where}: transformers cannot read it as a {model_type} config "
                           f"({type(e).__name__}: {reason})") from None



def normalize_config(raw: dict, where: str | Path = "config") -> dict:
    """A supported dense config as transformers 5 reads it (its stock class's to_dict), whatever wrote it.

    Other model types (MoE folders, families upcycle does not take) come back unchanged.
    """
    model_type = raw.get("model_type")
    if dense_architecture(model_type) is None:
        return raw
    for key in REQUIRED_KEYS:
        if key not in raw:
            raise UpcycleError(f"{where}: no {key!r}; a {model_type} config.json must give it (the weights' shapes "
                               "depend on it); add it")
        value = raw[key]
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise UpcycleError(f"{where}: {key}={value!r} must be a positive integer")
    return config_object(raw, str(where)).to_dict()


def unknown_key_problems(cfg: dict, where: str | Path = "config") -> list[str]:
    """Keys of a normalized dense config that its stock class does not define and that may matter."""
    cls = CONFIG_MAPPING[cfg["model_type"]]
    known = {f.name for f in dataclasses.fields(cls)} | set(COMMON_CONFIG_KEYS)
    problems = []
    for key, value in cfg.items():
        harmless = HARMLESS_UNKNOWN.get(key, dataclasses.MISSING)
        if key in known or harmless is ANY or (harmless is not dataclasses.MISSING and value == harmless):
            continue
        problems.append(f"{where}: {key}={value!r} is not a {cls.__name__} setting; upcycle cannot tell whether it "
                        "changes the model and would drop it (remove it from config.json if it does not matter)")
    return problems


WINDOWS = {
    "none": lambda c: [None] * c.num_hidden_layers,
    "every_layer": lambda c: [c.sliding_window] * c.num_hidden_layers,
    "every_layer_switched": lambda c: [c.sliding_window] * c.num_hidden_layers,  # nulled by the class when off
    "layer_types": lambda c: [c.sliding_window if t == "sliding_attention" else None for t in c.layer_types],
}


def _rotary(config, rotary_class: str) -> tuple[tuple[float, ...], float]:
    """Inverse frequencies and attention scaling, as the class's own rotary embedding computes them."""
    module = importlib.import_module(f"transformers.models.{config.model_type}.modeling_{config.model_type}")
    rotary = getattr(module, rotary_class)(config=config)
    return tuple(rotary.inv_freq.to(torch.float64).tolist()), float(rotary.attention_scaling)


def forward_facts(config) -> dict[str, Any]:
    """What a stock model's forward pass takes from its config, besides the MLP (the MoE replaces it)."""
    form = ATTENTION_FORMS[config.model_type]
    bias = lambda attr: bool(getattr(config, attr, False)) if isinstance(attr, str) else attr  # noqa: E731
    inv_freq, scaling = _rotary(config, form.rotary)
    return {
        **{k: getattr(config, k, None) for k in (
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "hidden_act", "rms_norm_eps", "tie_word_embeddings", "max_position_embeddings", "pad_token_id",
            "bos_token_id", "eos_token_id")},
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
        "rope_parameters": dict(config.rope_parameters or {}),
        "rotary frequencies": inv_freq,
        "rotary attention scaling": scaling,
        "attention bias (q/k/v, o)": (bias(form.qkv_bias), bias(form.o_bias)),
        "sliding window per layer": WINDOWS[form.window](config),
        "q/k norm": form.qk_norm,
    }


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def facts_mismatch(dense, moe) -> str | None:
    """The first forward fact the MoE config object would change, in words; None if all survive."""
    want, got = forward_facts(dense), forward_facts(moe)
    for key, value in want.items():
        if got[key] != value:
            return f"{key} is {_show(value)} in the dense model, {moe.model_type} would make it {_show(got[key])}"
    return None


def attention_keys(target_type: str, dense: dict) -> dict:
    """The target class's keys for the dense model's attention biases and sliding windows.

    Spelled from the dense model's facts, not copied by name: a Mistral window becomes Qwen2-MoE
    layer types, a Qwen2 q/k/v bias becomes qkv_bias. What cannot be spelled is caught by the
    fact comparison in `format_problem`.
    """
    facts = forward_facts(config_object(dense))
    form = ATTENTION_FORMS[target_type]
    out: dict = {}
    for attr, value in zip((form.qkv_bias, form.o_bias), facts["attention bias (q/k/v, o)"]):
        if isinstance(attr, str):
            out.setdefault(attr, value)
    out.update(WINDOW_SPELLING[form.window](facts["sliding window per layer"]))
    return out


def format_config(fmt, dense_cfg: dict, spec, expert_width: int, shared_width: int, intermediate: int,
                  dense_layers: list[int]) -> dict:
    """The config values MoE format `fmt` (architectures.MoEFormat) writes for this dense model."""
    return fmt.make_config(dense_cfg, spec, expert_width, shared_width, intermediate, dense_layers,
                           attention_keys(fmt.model_type, dense_cfg))


def format_problem(fmt, dense_cfg: dict, spec) -> str | None:
    """None if format `fmt` expresses the MoE of this (normalized) dense config exactly; otherwise the
    reason, for the error message: what it cannot express at all, or the first forward fact that
    the config it would write changes."""
    structural = fmt.structural_problem(dense_cfg, spec)
    if structural:
        return structural
    intermediate = dense_cfg["intermediate_size"]
    width = max(1, intermediate // spec.granularity)
    values = format_config(fmt, dense_cfg, spec, width, width * spec.num_shared_experts, intermediate, [])
    mismatch = facts_mismatch(config_object(dense_cfg), config_object(values))
    if mismatch:
        return f"format {fmt.name} cannot reproduce this {dense_cfg.get('model_type')} model: {mismatch}"
    return None