"""Exports for GGUF runtimes: a tied-embedding base exported as Qwen2-MoE writes its head as its own
tensor (llama.cpp's Qwen2-MoE loader needs output.weight), the same model either way; and (slow)
llama.cpp's own converter turns the exports into GGUF files with the tensors its loaders need."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.conftest import logits_of
from upcycle.cli import main

LLAMA_CPP_SDIST = "llama-cpp-python==0.3.36"  # ships llama.cpp's convert_hf_to_gguf.py and gguf-py


@pytest.mark.parametrize("fmt, untie, want_head", [("qwen2_moe", None, True), ("qwen2_moe", "false", False),
                                                   ("mixtral", None, False), ("mixtral", "true", True)])
def test_the_head_of_a_tied_base_is_written_untied_where_asked(llama_dir, tmp_path, token_ids, fmt, untie, want_head):
    assert json.loads((llama_dir / "config.json").read_text())["tie_word_embeddings"]
    out = tmp_path / fmt
    extra = [f"export.untie_embeddings={untie}"] if untie else []
    assert main(["build", "--base", str(llama_dir), "--out", str(out), "--num-experts", "2", "--top-k", "1", "--format", fmt,
                 "--quiet", *extra]) == 0
    tensors = load_file(out / "model.safetensors")
    assert ("lm_head.weight" in tensors) is want_head
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is (not want_head)
    if want_head:
        assert torch.equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"])
    dense = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    moe = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert (logits_of(moe, token_ids) - logits_of(dense, token_ids)).abs().max() < 1e-4  # the same model


def llama_cpp_converter(cache: Path) -> Path:
    """llama.cpp's converter and gguf-py from the llama-cpp-python sdist on PyPI (fetched once)."""
    root = cache / "llama-cpp-converter"
    script = root / "llama.cpp" / "convert_hf_to_gguf.py"
    if script.is_file():
        return script
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d",
                    str(root), LLAMA_CPP_SDIST], check=True)
    sdist = next(root.glob("llama_cpp_python-*.tar.gz"))
    with tarfile.open(sdist) as tar:
        prefix = tar.getnames()[0].split("/")[0] + "/vendor/llama.cpp/"
        members = [m for m in tar.getmembers() if m.name.startswith(prefix) and
                   (m.name.endswith("convert_hf_to_gguf.py") or "/gguf-py/" in m.name or "/conversion/" in m.name)]
        for m in members:
            m.name = "llama.cpp/" + m.name.removeprefix(prefix)
        tar.extractall(root, members=members, filter="data")
    return script


@pytest.mark.slow
def test_llama_cpp_converts_the_exports_and_finds_the_head_it_needs(tmp_path):
    """A tiny Llama with SmolLM2's (tied) embeddings and tokenizer, exported as Qwen2-MoE and Mixtral,
    converted by llama.cpp's convert_hf_to_gguf.py: the Qwen2-MoE file holds output.weight (auto untie)
    and the one written tied does not; Mixtral's loader falls back to the embedding."""
    from transformers import AutoConfig, AutoTokenizer

    from upcycle.bundled import cache_root, smollm2_dir

    smol = smollm2_dir(progress=False)
    cfg = AutoConfig.from_pretrained(smol)
    cfg.update(dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16))
    torch.manual_seed(0)
    base = tmp_path / "tiny-smol"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(base)
    AutoTokenizer.from_pretrained(smol).save_pretrained(base)
    script = llama_cpp_converter(cache_root() / "tools")
    from gguf import GGUFReader

    env = {**os.environ, "PYTHONPATH": f"{script.parent / 'gguf-py'}{os.pathsep}{script.parent}"}
    names = {}
    for name, argv in (("qwen2_moe", ["--format", "qwen2_moe"]), ("qwen2_moe_tied", ["--format", "qwen2_moe",
                       "export.untie_embeddings=false"]), ("mixtral", ["--format", "mixtral"])):
        out = tmp_path / name
        assert main(["build", "--base", str(base), "--out", str(out), "--num-experts", "2", "--top-k", "1", "--quiet",
                     *argv]) == 0
        gguf = tmp_path / f"{name}.gguf"
        proc = subprocess.run([sys.executable, str(script), str(out), "--outfile", str(gguf), "--outtype", "f32"],
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        names[name] = {t.name for t in GGUFReader(str(gguf)).tensors}
    assert "output.weight" in names["qwen2_moe"] and "output.weight" not in names["qwen2_moe_tied"]
    assert {"blk.0.ffn_gate_exps.weight", "token_embd.weight"} <= names["mixtral"]
