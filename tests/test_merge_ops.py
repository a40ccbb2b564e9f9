"""Merge methods: exact values on small tensors, agreement with peft.utils.merge_utils, DARE statistics."""

import pytest
import torch
from peft.utils import merge_utils

from upcycle.merge import ops
from upcycle.merge.methods import METHODS, MergeParams, merge_tensor
from upcycle.seeding import generator


def test_task_arithmetic_exact():
    base = torch.tensor([1.0, 1.0, 1.0])
    a, b = torch.tensor([2.0, 1.0, 0.0]), torch.tensor([1.0, 3.0, 1.0])  # tau_a = [1,0,-1], tau_b = [0,2,0]
    out = merge_tensor(METHODS["task_arithmetic"], base, [a, b], MergeParams(weights=(1.0, 0.5), scale=2.0))
    assert out.tolist() == [1 + 2 * 1, 1 + 2 * 1, 1 + 2 * -1]


def test_linear_average_exact():
    out = merge_tensor(METHODS["linear"], None, [torch.tensor([0.0, 4.0]), torch.tensor([2.0, 0.0])],
                       MergeParams(weights=(1.0, 3.0)))
    assert out.tolist() == [1.5, 1.0]


def test_ties_sign_election_and_disjoint_mean_exact():
    base = torch.zeros(4)
    t1 = torch.tensor([3.0, -2.0, 1.0, 0.5])
    t2 = torch.tensor([-1.0, -4.0, 2.0, -0.5])
    t3 = torch.tensor([-1.0, 1.0, -5.0, 0.2])
    # density 1: no trimming. Sums: [1, -5, -2, 0.2] -> signs [+, -, -, +].
    # entry 0: only t1 agrees (+3) -> 3; entry 1: t1, t2 -> (-2 - 4)/2 = -3; entry 2: t3 -> -5; entry 3: t1, t3 -> 0.35
    out = merge_tensor(METHODS["ties"], base, [t1, t2, t3], MergeParams(weights=(1, 1, 1), density=1.0))
    assert torch.allclose(out, torch.tensor([3.0, -3.0, -5.0, 0.35]))
    # frequency election: votes [-1, -1, +1 (t1,t2 vs t3) -> +, +] -> entry 0: mean(-1, -1) = -1, entry 2: mean(1, 2) = 1.5
    out = merge_tensor(METHODS["ties"], base, [t1, t2, t3], MergeParams(weights=(1, 1, 1), density=1.0, sign_method="frequency"))
    assert torch.allclose(out, torch.tensor([-1.0, -3.0, 1.5, 0.35]))


def test_magnitude_trim_exact():
    assert ops.magnitude_trim(torch.tensor([0.1, -3.0, 2.0, -0.5]), 0.5).tolist() == [0.0, -3.0, 2.0, -0.0]


def test_dare_drop_rate_and_rescale_exact():
    tau = torch.arange(1.0, 9.0)
    keep = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0], dtype=torch.bool)
    assert ops.dare(tau, 0.5, keep=keep).tolist() == [2.0, 0, 6.0, 8.0, 0, 0, 14.0, 0]
    l1 = ops.dare(tau, 0.5, keep=keep, rescale="l1")
    assert l1.abs().sum().item() == pytest.approx(tau.abs().sum().item())
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        ops.dare(tau, 1.0)


def test_dare_drop_rate_statistics():
    tau = torch.ones(200_000)
    out = ops.dare(tau, 0.3, generator(0, "dare"))
    dropped = (out == 0).float().mean().item()
    assert dropped == pytest.approx(0.3, abs=0.005)  # 200k Bernoulli draws: sd ~0.001
    assert torch.allclose(out[out != 0], torch.full_like(out[out != 0], 1 / 0.7))


def peft_masks(taus, density, seed):
    """The masks peft's random_pruning would draw after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    return [torch.bernoulli(torch.full_like(t, density)).bool() for t in taus]


@pytest.mark.parametrize("name,peft_fn", [("dare", merge_utils.dare_linear), ("dare_ties", merge_utils.dare_ties),
                                          ("ties", merge_utils.ties), ("task_arithmetic", merge_utils.task_arithmetic)])
def test_agrees_with_peft_merge_utils(name, peft_fn):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    models = [base + torch.randn(6, 5, generator=g) for _ in range(3)]
    taus = [m - base for m in models]
    weights = torch.tensor([0.5, 1.0, 0.25])
    density = 0.6
    masks = peft_masks(taus, density, seed=7)
    torch.manual_seed(7)
    if name == "task_arithmetic":
        expected = peft_fn(taus, weights)
    else:
        expected = peft_fn(taus, weights, density)
    params = MergeParams(weights=tuple(weights.tolist()), density=density, drop_p=1 - density)
    got = merge_tensor(METHODS[name], base, models, params, keep_masks=masks) - base
    assert torch.allclose(got, expected, atol=1e-5)


def test_mean_of_many_dare_children_approaches_the_weighted_sum():
    """E[DARE(a tau_j) + DARE((1-a) tau_k)] = a tau_j + (1-a) tau_k.

    2000 children of 64 entries with p = 0.5: each entry's mean has sd <= |tau| / sqrt(2000) * 1 ~ 0.022 * |tau|;
    tolerance 0.1 (4.5 sd) on |tau| <= 1."""
    g = torch.Generator().manual_seed(3)
    base = torch.zeros(64)
    tj, tk = torch.rand(64, generator=g) * 2 - 1, torch.rand(64, generator=g) * 2 - 1
    a = 0.3
    params = MergeParams(weights=(a, 1 - a), drop_p=0.5)
    children = [merge_tensor(METHODS["dare"], base, [tj, tk], params,
                             generators=[generator(0, "child", n, 0), generator(0, "child", n, 1)]) for n in range(2000)]
    mean = torch.stack(children).mean(0)
    assert (mean - (a * tj + (1 - a) * tk)).abs().max() < 0.1


def test_dare_is_deterministic_per_generator():
    tau = torch.randn(100, generator=torch.Generator().manual_seed(0))
    a = ops.dare(tau, 0.5, generator(1, "x"))
    b = ops.dare(tau, 0.5, generator(1, "x"))
    c = ops.dare(tau, 0.5, generator(2, "x"))
    assert torch.equal(a, b) and not torch.equal(a, c)
