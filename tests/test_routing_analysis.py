"""Routing analysis on constructed routers: diagonal for a router that sends domain d to expert d,
near uniform for a random router on random text."""

import torch
from transformers import AutoModelForCausalLM

from upcycle import upcycle_model
from upcycle.config import InitSpec, MoESpec
from upcycle.eval.routing import plot_routing, routing_shares, specialization
from upcycle.moe.model import moe_blocks
from upcycle.tiny import char_tokenizer

LETTERS = "wxyz"


def hand_built(llama_dir):
    """Attention and experts output zero, so every MoE layer sees the normalized token embedding;
    letter d's embedding is basis vector d and router row d reads it: domain d -> expert d."""
    tok = char_tokenizer()
    model = upcycle_model(AutoModelForCausalLM.from_pretrained(llama_dir), MoESpec(num_experts=4, top_k=1), InitSpec(), seed=0)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.post_attention_layernorm.weight.fill_(1.0)
        for _, block in moe_blocks(model):
            block.experts.down_proj.zero_()
            block.router.weight.zero_()
            for d in range(4):
                block.router.weight[d, d] = 10.0
        for d, letter in enumerate(LETTERS):
            row = torch.zeros(model.config.hidden_size)
            row[d] = 1.0
            model.model.embed_tokens.weight[tok.convert_tokens_to_ids(letter)] = row
    return model, tok


def test_hand_built_router_gives_a_diagonal_heatmap(llama_dir, tmp_path):
    model, tok = hand_built(llama_dir)
    texts = {f"domain{d}": [LETTERS[d] * n for n in (5, 9, 12)] for d in range(4)}
    shares = routing_shares(model, tok, texts)
    for d in range(4):
        assert shares[f"domain{d}"].shape == (2, 4)  # (layers, experts)
        assert torch.allclose(shares[f"domain{d}"], torch.eye(4)[d].expand(2, 4))
    assert all(abs(v - 1.0) < 1e-6 for v in specialization(shares).values())
    plot_routing(shares, tmp_path / "routing.png")
    assert (tmp_path / "routing.png").stat().st_size > 1000


def test_domain_blind_router_gives_a_uniform_heatmap(llama_dir):
    """The same router, on domains that all use the four letters equally: every domain's tokens spread
    evenly over the experts (exactly 1/4 each), so the heatmap is flat and specialization is 0."""
    model, tok = hand_built(llama_dir)
    texts = {"mixed": ["wxyz" * 5, "zyxw" * 3], "shuffled": ["xwzy" * 4], "pairs": ["wwxxyyzz" * 2]}
    shares = routing_shares(model, tok, texts)
    for s in shares.values():
        assert torch.allclose(s, torch.full((2, 4), 0.25))
    assert all(abs(v) < 1e-6 for v in specialization(shares).values())
