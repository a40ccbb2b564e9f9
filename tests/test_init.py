"""Initializers: weight-scaling factors, virtual groups, Drop-Upcycling, determinism."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from upcycle.config import InitSpec, MoESpec
from upcycle.moe.init import (
    MLPWeights, activation_scale, drop_reinit, dropped_indices, init_expert, init_router, nvidia_scale, shard,
)
from upcycle.seeding import generator


def dense_mlp(i=48, h=16, seed=0) -> MLPWeights:
    g = torch.Generator().manual_seed(seed)
    return MLPWeights(torch.randn(i, h, generator=g), torch.randn(i, h, generator=g), torch.randn(h, i, generator=g))


def mlp_forward(w: MLPWeights, x):
    return F.linear(F.silu(F.linear(x, w.gate)) * F.linear(x, w.up), w.down)


# ------------------------------------------------------------------ weight scaling (SPEC section 2)


def test_e8g8t8_softmax_topk_swiglu_scale_is_4():
    a = activation_scale(num_experts=64, granularity=8, top_k=8, routing="softmax_topk")
    assert a == 64  # E*G^2/T = 8*64/8
    assert nvidia_scale(a, "gated") == pytest.approx(4.0)


def test_e8g8t8_topk_softmax_scale_is_cube_root_of_8():
    a = activation_scale(num_experts=64, granularity=8, top_k=8, routing="topk_softmax")
    assert a == 8  # G
    assert nvidia_scale(a, "gated") == pytest.approx(8 ** (1 / 3))
    assert nvidia_scale(a, "plain") == pytest.approx(8 ** 0.5)


def test_nvidia_scaling_multiplies_all_three_projections():
    dense = dense_mlp()
    spec = MoESpec(num_experts=64, top_k=8, granularity=8, routing="softmax_topk")
    e = init_expert(dense, 3, 0, spec, InitSpec(method="virtual_group", weight_scaling="nvidia"), seed=0)
    plain = shard(dense, 3, 8)
    for got, ref in ((e.gate, plain.gate), (e.up, plain.up), (e.down, plain.down)):
        assert torch.allclose(got, ref * 4.0, atol=1e-5)


# ------------------------------------------------------------------ virtual groups


def test_shards_sum_to_the_dense_mlp():
    dense, x = dense_mlp(), torch.randn(5, 16)
    total = sum(mlp_forward(shard(dense, j, 4), x) for j in range(4))
    assert torch.allclose(total, mlp_forward(dense, x), atol=1e-4)


def test_virtual_group_expert_j_holds_shard_j_mod_g():
    dense = dense_mlp()
    spec = MoESpec(num_experts=6, top_k=3, granularity=3)
    init = InitSpec(method="virtual_group")
    for j in range(6):
        assert torch.equal(init_expert(dense, j, 0, spec, init, 0).gate, shard(dense, j % 3, 3).gate)


def test_router_rows_come_in_identical_blocks_of_g():
    w = init_router(num_experts=8, hidden=16, granularity=4, std=0.02, gen=generator(0, "r"))
    assert torch.equal(w[0], w[3]) and torch.equal(w[4], w[7])
    assert not torch.equal(w[3], w[4])
    # Identical rows give identical logits, so top-G picks one whole group (one full MLP copy).
    x = torch.randn(32, 16)
    _, idx = torch.topk(x @ w.T, 4, dim=-1)
    groups = (idx // 4)
    assert torch.all(groups == groups[:, :1])


# ------------------------------------------------------------------ Drop-Upcycling (SPEC section 3)


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.3])
def test_drop_reinitializes_exactly_floor_r_i_indices(ratio):
    dense = dense_mlp(i=50)
    out = drop_reinit(dense, ratio, "shared", generator(0, "d"))
    k = math.floor(ratio * 50)
    rows_gate = dropped_indices(dense.gate, out.gate, 0)
    rows_up = dropped_indices(dense.up, out.up, 0)
    cols_down = dropped_indices(dense.down, out.down, 1)
    assert len(rows_gate) == len(rows_up) == len(cols_down) == k
    # shared: one index set for the three matrices
    assert torch.equal(rows_gate, rows_up) and torch.equal(rows_gate, cols_down)


def test_per_matrix_index_sets_differ():
    dense = dense_mlp(i=64)
    out = drop_reinit(dense, 0.5, "per_matrix", generator(0, "d"))
    rows_gate = dropped_indices(dense.gate, out.gate, 0)
    rows_up = dropped_indices(dense.up, out.up, 0)
    assert len(rows_gate) == len(rows_up) == 32
    assert not torch.equal(rows_gate, rows_up)


def test_drop_draws_from_the_replaced_blocks_mean_and_std():
    # A block with a known, non-standard distribution: mean 3, std 0.5.
    g = torch.Generator().manual_seed(0)
    i, h = 2000, 64
    w = MLPWeights(3 + 0.5 * torch.randn(i, h, generator=g), torch.randn(i, h, generator=g), torch.randn(h, i, generator=g))
    out = drop_reinit(w, 0.5, "shared", generator(0, "stats"))
    idx = dropped_indices(w.gate, out.gate, 0)
    new, old = out.gate[idx], w.gate[idx]
    # 64,000 fresh draws: the sample mean/std are within 1% of the replaced block's.
    assert new.mean().item() == pytest.approx(old.mean().item(), abs=0.01)
    assert new.std().item() == pytest.approx(old.std().item(), rel=0.01)
    # Untouched rows are kept bit for bit.
    keep = torch.ones(i, dtype=torch.bool)
    keep[idx] = False
    assert torch.equal(out.gate[keep], w.gate[keep])


def test_drop_experts_differ_and_are_deterministic():
    dense = dense_mlp()
    spec, init = MoESpec(num_experts=4, top_k=2), InitSpec(method="drop", drop_ratio=0.5)
    experts = [init_expert(dense, e, 0, spec, init, seed=7) for e in range(4)]
    again = [init_expert(dense, e, 0, spec, init, seed=7) for e in range(4)]
    other_seed = init_expert(dense, 0, 0, spec, init, seed=8)
    for a, b in zip(experts, again):
        assert torch.equal(a.gate, b.gate) and torch.equal(a.down, b.down)
    for a in range(4):
        assert not torch.equal(experts[a].gate, dense.gate)
        for b in range(a + 1, 4):
            assert not torch.equal(experts[a].gate, experts[b].gate)
    assert not torch.equal(other_seed.gate, experts[0].gate)


def test_generators_depend_on_seed_and_name_not_on_other_draws():
    """A draw is a function of (seed, name) alone: other generators' draws and the global RNG leave it unchanged,
    every part of the name and the seed change it, and a fresh process draws the same (no salted hash())."""
    def draw(*key):
        return torch.randn(8, generator=generator(*key)).tolist()

    torch.manual_seed(0)
    a = draw(0, "layer", 1, "router")
    torch.randn(100, generator=generator(0, "layer", 0, "router"))
    torch.manual_seed(1)
    torch.randn(100)
    assert draw(0, "layer", 1, "router") == a
    for other in [(1, "layer", 1, "router"), (0, "layer", 0, "router"), (0, "layer", 1, "expert"), (0, "layer", 1)]:
        assert draw(*other) != a, other
    code = "import json, torch; from upcycle.seeding import generator; " \
           "print(json.dumps(torch.randn(8, generator=generator(0, 'layer', 1, 'router')).tolist()))"
    for hash_seed in ("1", "2"):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": hash_seed})
        assert json.loads(proc.stdout) == a
