"""Parity: upcycle's MoE block and the stock transformers MoE classes agree on the same weights.

The stock model is made by transformers itself (its own random init, then scaled so routing is
decisive), saved with its own save_pretrained, and loaded into upcycle's model with `load_moe`.
"""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from upcycle import load_moe
from upcycle.moe.model import moe_aux_losses
from upcycle.tiny import TINY_CONFIGS

COMMON = {k: v for k, v in TINY_CONFIGS["llama"].items() if k != "tie_word_embeddings"}
STOCK = {
    # Mixtral: renormalized top-k.
    "mixtral": dict(COMMON, num_local_experts=4, num_experts_per_tok=2),
    # Qwen2-MoE without renormalization (softmax_topk), fine-grained experts, a gated shared expert and one dense layer.
    "qwen2_moe": dict(COMMON, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, intermediate_size=64,
                      shared_expert_intermediate_size=32, norm_topk_prob=False, mlp_only_layers=[1], qkv_bias=True),
    # Qwen3-MoE with renormalization and q/k norms.
    "qwen3_moe": dict(COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=64,
                      norm_topk_prob=True, head_dim=16),
}


def stock_model(model_type, seed=0):
    config = AutoConfig.for_model(model_type, **STOCK[model_type])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.2 * noise)
    return model.eval()


@pytest.mark.parametrize("model_type", list(STOCK))
def test_block_matches_stock_class(tmp_path, token_ids, model_type):
    stock = stock_model(model_type)
    stock.save_pretrained(tmp_path / "stock")
    ours = load_moe(tmp_path / "stock").eval()
    mask = torch.ones_like(token_ids)
    mask[1, :3] = 0  # left padding: the aux loss must leave these tokens out, as transformers does
    with torch.no_grad():
        ref = stock(token_ids, attention_mask=mask, output_router_logits=True)
        out = ours(token_ids, attention_mask=mask)
    assert ref.logits.abs().mean() > 0.1
    assert (out.logits - ref.logits).abs().max() <= 1e-4
    # Router logits layer by layer, then the aux loss computed the way transformers does ("global").
    assert len(out.router_logits) == len(ref.router_logits)
    for a, b in zip(out.router_logits, ref.router_logits):
        assert torch.allclose(a, b, atol=1e-5)
    ours.upcycle_spec = ours.upcycle_spec.model_copy(update={"aux_loss_scope": "global"})
    with torch.no_grad():
        ours(token_ids, attention_mask=mask)
    aux = moe_aux_losses(ours, mask)["aux_loss"]
    assert aux.item() == pytest.approx(ref.aux_loss.item(), rel=1e-5)


def router_weights(model):
    """Each MoE layer's router weight (N, hidden): ours `mlp.router`, transformers' `mlp.gate`."""
    return [(layer.mlp.router if hasattr(layer.mlp, "router") else layer.mlp.gate).weight for layer in model.model.layers]


def test_training_loss_and_router_gradients_equal_stock_with_aux_loss(tmp_path, token_ids):
    """loss = LM + coef * aux, and its gradient reaches the router weights through the aux loss exactly as in
    transformers: the router gradients match stock Mixtral's with coef 0.5, and the aux loss's share of them
    (coef 0.5 minus coef 0) is far larger than the tolerance, so a detached aux loss would fail."""
    stock = stock_model("mixtral")
    stock.save_pretrained(tmp_path / "stock")
    ours = load_moe(tmp_path / "stock")
    grads = {}
    for coef in (0.0, 0.5):
        ours.upcycle_spec = ours.upcycle_spec.model_copy(update={"aux_loss_scope": "global", "aux_loss_coef": coef})
        stock.config.router_aux_loss_coef = stock.router_aux_loss_coef = coef
        for name, model in (("ours", ours), ("stock", stock)):
            model.train()
            model.zero_grad()
            kwargs = {"output_router_logits": True} if name == "stock" else {}
            out = model(token_ids, labels=token_ids, **kwargs)
            out.loss.backward()
            grads[name, coef] = [w.grad.clone() for w in router_weights(model)]
            grads[name, coef, "loss"] = out.loss.item()
    assert grads["ours", 0.5, "loss"] == pytest.approx(grads["stock", 0.5, "loss"], rel=1e-5)
    assert grads["ours", 0.5, "loss"] != pytest.approx(grads["ours", 0.0, "loss"], rel=1e-4)
    for layer, (g_ours, g_stock, g_lm) in enumerate(zip(grads["ours", 0.5], grads["stock", 0.5], grads["stock", 0.0])):
        aux_share = (g_stock - g_lm).abs().max().item()
        assert aux_share > 1e-3, layer
        assert (g_ours - g_stock).abs().max().item() < 1e-3 * aux_share, layer


def test_generate_matches_stock(tmp_path):
    stock = stock_model("mixtral")
    stock.save_pretrained(tmp_path / "stock")
    ours = load_moe(tmp_path / "stock").eval()
    prompt = torch.tensor([[5, 17, 33, 9]])
    a = stock.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    b = ours.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert a.tolist() == b.tolist()
