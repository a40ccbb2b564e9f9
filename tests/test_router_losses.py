"""Routing orders and auxiliary losses: exact values on small tensors, and transformers' own loss."""

import math

import pytest
import torch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from upcycle.moe.losses import expert_load, load_balancing_loss, router_z_loss
from upcycle.moe.router import route

LOGITS = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 1.0, 1.0]])


def softmax_row(row):
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def test_softmax_topk_is_not_renormalized():
    w, idx = route(LOGITS, 2, "softmax_topk")
    p0, p1 = softmax_row([2, 1, 0, -1]), softmax_row([0, 3, 1, 1])
    assert idx.tolist() == [[0, 1], [1, 2]] or idx.tolist() == [[0, 1], [1, 3]]
    assert torch.allclose(w[0], torch.tensor([p0[0], p0[1]]), atol=1e-7)
    assert torch.allclose(w[1], torch.tensor([p1[1], p1[2]]), atol=1e-7)
    assert w[0].sum() < 1


def test_topk_softmax_equals_renormalized_softmax_topk():
    w_a, i_a = route(LOGITS, 2, "topk_softmax")
    w_b, i_b = route(LOGITS, 2, "softmax_topk_renorm")
    assert torch.equal(i_a, i_b)
    assert torch.allclose(w_a, w_b, atol=1e-7)
    # Softmax over the top-2 logits of row 0: (2, 1) -> (e/(e+1), 1/(e+1)).
    assert torch.allclose(w_a[0], torch.tensor([math.e / (math.e + 1), 1 / (math.e + 1)]), atol=1e-7)


def test_load_balancing_loss_exact_value():
    # Row 0 picks {0,1}, row 1 picks {1,2}: f = [1/2, 1, 1/2, 0]; P = mean of the two softmax rows.
    p0, p1 = softmax_row([2, 1, 0, -1]), softmax_row([0, 3, 1, 1])
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 1.5, 1.0]])
    p1 = softmax_row([0, 3, 1.5, 1])
    f = [0.5, 1.0, 0.5, 0.0]
    P = [(a + b) / 2 for a, b in zip(p0, p1)]
    expected = 4 * sum(fi * pi for fi, pi in zip(f, P))
    got = load_balancing_loss([logits], top_k=2)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_uniform_router_scores_top_k():
    logits = torch.zeros(8, 4)
    logits[:, :] = torch.tensor([0.0, 1e-4, 2e-4, 3e-4]).roll(1)  # break ties, ~uniform probs
    rows = torch.stack([logits[0].roll(i) for i in range(8)])
    assert load_balancing_loss([rows], top_k=2).item() == pytest.approx(2.0, rel=1e-3)


@pytest.mark.parametrize("masked", [False, True])
def test_global_scope_matches_transformers(masked):
    g = torch.Generator().manual_seed(1)
    layers = tuple(torch.randn(12, 6, generator=g) for _ in range(3))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2]) if masked else None
    ours = load_balancing_loss(layers, top_k=2, scope="global", attention_mask=mask)
    theirs = load_balancing_loss_func(layers, num_experts=6, top_k=2, attention_mask=mask)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)


def test_per_layer_scope_is_mean_of_single_layer_losses():
    g = torch.Generator().manual_seed(2)
    layers = [torch.randn(10, 4, generator=g) for _ in range(3)]
    per_layer = load_balancing_loss(layers, top_k=1, scope="per_layer")
    singles = [load_balancing_loss_func((l,), num_experts=4, top_k=1) for l in layers]
    assert per_layer.item() == pytest.approx(sum(s.item() for s in singles) / 3, rel=1e-6)


def test_z_loss_exact():
    logits = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    # logsumexp = log 2 and 1 + log 2.
    expected = (math.log(2) ** 2 + (1 + math.log(2)) ** 2) / 2
    assert router_z_loss([logits]).item() == pytest.approx(expected, rel=1e-6)


def test_expert_load_counts_assignments():
    load = expert_load(LOGITS, 1)
    assert load.tolist() == [0.5, 0.5, 0.0, 0.0]


def test_router_logits_stay_fp32_under_bf16_autocast():
    """The Trainer's bf16 autocast must not round the router's matmul to bf16 (routing decisions flip)."""
    from upcycle.moe.router import Router

    g = torch.Generator().manual_seed(0)
    router = Router(hidden_size=64, num_experts=8, top_k=2, routing="topk_softmax")
    with torch.no_grad():
        router.weight.copy_(torch.randn(8, 64, generator=g))
    x = torch.randn(32, 64, generator=g)
    reference = (x.double() @ router.weight.double().T)  # independent fp64 reference
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        logits, _, _ = router(x)
    assert logits.dtype == torch.float32
    assert (logits.double() - reference).abs().max() < 1e-4  # bf16 rounding would give ~1e-1 here
