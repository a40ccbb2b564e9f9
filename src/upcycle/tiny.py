"""Tiny dense models and a character tokenizer, built locally: fixtures for tests and benchmarks.

Nothing here downloads. Weights are drawn from a seeded generator with a larger scale than the
stock init, so logits and routing decisions differ visibly between tokens (a test comparing
near-zero logits would pass for the wrong reasons).
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from upcycle.seeding import generator

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

BASE = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
            pad_token_id=0)
TINY_CONFIGS: dict[str, dict] = {
    "llama": dict(BASE, tie_word_embeddings=True),
    "mistral": dict(BASE, sliding_window=6),
    "qwen2": dict(BASE),
    "qwen3": dict(BASE, head_dim=16),  # head_dim != hidden/heads, as in real Qwen3 models
}


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII with ChatML specials (fits vocab 128)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, decoders

    chars = [c for c in string.printable if c not in "\x0b\x0c"]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every char, newlines too
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = CHATML_TEMPLATE
    return fast


def tiny_model(model_type: str, seed: int = 0, scale: float = 0.15, **overrides):
    """A randomly initialized dense model of `model_type` with seeded, non-trivial weights."""
    values = dict(TINY_CONFIGS[model_type], **overrides)
    config = AutoConfig.for_model(model_type, **values)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    g = generator(seed, "tiny", model_type)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else scale * noise)
    model.eval()
    return model


def save_tiny_model(model_type: str, path: str | Path, seed: int = 0, **overrides) -> Path:
    """Write a tiny model and the character tokenizer to `path` (a Hugging Face folder)."""
    path = Path(path)
    model = tiny_model(model_type, seed, **overrides)
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path
