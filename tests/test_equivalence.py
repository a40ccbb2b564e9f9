"""Function preservation: an upcycled model exported to a stock class reproduces the dense logits."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.conftest import logits_of
from upcycle.config import BuildConfig, InitSpec, MoESpec
from upcycle.moe.block import MoEBlock, dense_mlp_weights
from upcycle.moe.layer import UpcycledLayer
from upcycle.stages import build

PAIRS = [("llama", "mixtral"), ("mistral", "mixtral"), ("llama", "qwen2_moe"), ("qwen2", "qwen2_moe"),
         ("qwen3", "qwen3_moe")]


def build_cfg(base, out, **kw):
    moe = kw.pop("moe", {})
    init = kw.pop("init", {})
    export = kw.pop("export", {})
    return BuildConfig(base=base, out=out, moe=MoESpec(**moe), init=InitSpec(**init), **({"export": export} | kw))


@pytest.mark.parametrize("model_type,fmt", PAIRS)
def test_copy_topk_softmax_reproduces_dense_logits(dense_dirs, tmp_path, token_ids, model_type, fmt):
    out = tmp_path / "moe"
    summary = build.run(build_cfg(dense_dirs[model_type], out, moe=dict(num_experts=4, top_k=2, routing="topk_softmax"),
                                  export=dict(format=fmt)), progress=False)
    assert summary["format"] == fmt
    dense = AutoModelForCausalLM.from_pretrained(dense_dirs[model_type])
    moe = AutoModelForCausalLM.from_pretrained(out)
    assert type(moe).__name__ == {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                                  "qwen3_moe": "Qwen3MoeForCausalLM"}[fmt]
    ref = logits_of(dense, token_ids)
    assert ref.abs().mean() > 0.1  # non-trivial logits, so the comparison means something
    assert (logits_of(moe, token_ids) - ref).abs().max() <= 1e-4


def test_mixtral_keeps_mistral_sliding_window(dense_dirs, tmp_path):
    """The tiny Mistral has sliding_window=6; with 16 tokens the window matters."""
    out = tmp_path / "moe"
    build.run(build_cfg(dense_dirs["mistral"], out, moe=dict(num_experts=2, top_k=1)), progress=False)
    ids = torch.randint(6, 128, (1, 16), generator=torch.Generator().manual_seed(3))
    dense = AutoModelForCausalLM.from_pretrained(dense_dirs["mistral"])
    moe = AutoModelForCausalLM.from_pretrained(out)
    assert moe.config.sliding_window == 6
    assert (logits_of(moe, ids) - logits_of(dense, ids)).abs().max() <= 1e-4


def test_virtual_group_e2g2t2_with_output_scaling_reproduces_dense_logits(llama_dir, tmp_path, token_ids):
    """E2G2T2, topk_softmax: top-2 picks one whole virtual group, each shard weighted 1/2, so the MoE gives
    exactly half the dense MLP; scaling down_proj by a = G = 2 ('output' scaling) restores it."""
    out = tmp_path / "moe"
    build.run(build_cfg(llama_dir, out, moe=dict(num_experts=4, top_k=2, granularity=2, routing="topk_softmax"),
                        init=dict(method="virtual_group", weight_scaling="output"), export=dict(format="mixtral")),
              progress=False)
    dense = AutoModelForCausalLM.from_pretrained(llama_dir)
    moe = AutoModelForCausalLM.from_pretrained(out)
    assert moe.config.intermediate_size == dense.config.intermediate_size // 2
    assert (logits_of(moe, token_ids) - logits_of(dense, token_ids)).abs().max() <= 1e-4


def test_virtual_group_without_scaling_gives_dense_mlp_over_g(llama_dir):
    """Without scaling the block output is exactly (1/G) * dense MLP: the reason the scaling rule exists."""
    dense_model = AutoModelForCausalLM.from_pretrained(llama_dir)
    mlp = dense_model.model.layers[0].mlp
    spec = MoESpec(num_experts=4, top_k=2, granularity=2, routing="topk_softmax")
    block = MoEBlock(spec, 32, 64, "silu").fill_from(
        UpcycledLayer(dense_mlp_weights(mlp), 0, spec, InitSpec(method="virtual_group"), seed=0))
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(block(x), mlp(x) / 2, atol=1e-5)


def test_softmax_topk_copy_scales_output_by_chosen_probability_mass(llama_dir):
    """softmax_topk without renormalization: copy experts give (sum of top-k probs) * dense MLP."""
    dense_model = AutoModelForCausalLM.from_pretrained(llama_dir)
    mlp = dense_model.model.layers[1].mlp
    spec = MoESpec(num_experts=4, top_k=2, routing="softmax_topk", router_init_std=0.05)
    block = MoEBlock(spec, 32, 64, "silu").fill_from(UpcycledLayer(dense_mlp_weights(mlp), 1, spec, InitSpec(), seed=0))
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = block(x)
        mass = torch.topk(torch.softmax(block.last_router_logits, -1), 2, dim=-1).values.sum(-1)
    assert torch.allclose(y, mlp(x) * mass.reshape(3, 5, 1), atol=1e-5)
    assert mass.max() < 0.9  # the chosen mass is well below 1: renormalization would matter
