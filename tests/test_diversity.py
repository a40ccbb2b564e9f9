"""Diversity diagnostics flag a degenerate pool (identical experts, indistinguishable perplexities,
one expert owning the buckets) and pass a diverse one; the router pre-training targets by hand."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

from tests.test_expand import base_dir, fake_prepare, random_tv  # noqa: F401 - base_dir is a fixture
from upcycle.config import ExpandConfig
from upcycle.routing.diversity import normalized_entropy, pool_diversity, seed_diversity
from upcycle.routing.loss import router_loss
from upcycle.stages import expand


def test_identical_experts_are_a_degenerate_pool_and_orthogonal_ones_are_not():
    same = pool_diversity(torch.ones(4, 4), ["checkpoint"] * 4)
    assert same["degenerate"] and "degenerate" in same["warning"] and same["pairwise_cosine"]["mean"] == 1.0
    diverse = pool_diversity(torch.eye(4), ["checkpoint", "checkpoint", "child", "child"])
    assert not diverse["degenerate"] and diverse["warning"] is None
    assert diverse["pairwise_cosine"] == {"min": 0.0, "mean": 0.0, "max": 0.0}
    assert diverse["checkpoint_cosine"] == {"min": 0.0, "mean": 0.0, "max": 0.0}  # the one checkpoint pair


def test_seed_diagnostics_by_hand():
    flat = seed_diversity(torch.full((6, 3), 5.0), torch.zeros(6, dtype=torch.long))
    assert flat["degenerate"] and flat["ppl_spread"]["median"] == 0.0 and "indistinguishable" in flat["warning"]
    # each sample has its own best expert, twice as good as the worst: spread 1.0, even buckets
    ppl = torch.tensor([[1.0, 2.0, 2.0], [2.0, 1.0, 2.0], [2.0, 2.0, 1.0]] * 2)
    owners = ppl.argmin(1)
    good = seed_diversity(ppl, owners)
    assert not good["degenerate"] and good["ppl_spread"]["median"] == pytest.approx(1.0)
    assert good["argmin_bucket_sizes"] == [2, 2, 2] and good["argmin_bucket_entropy"] == pytest.approx(1.0)
    skewed = seed_diversity(torch.tensor([[1.0, 3.0, 3.0]] * 6), torch.zeros(6, dtype=torch.long))
    assert skewed["degenerate"] and "one expert owns most" in skewed["warning"]
    assert normalized_entropy([3, 1, 0, 0]) == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(4))


@pytest.mark.parametrize("identical", [True, False])
def test_expand_reports_the_pool_and_warns_when_it_is_copies(tmp_path, base_dir, identical):  # noqa: F811
    tvs = [random_tv(1)] * 4 if identical else [random_tv(s) for s in range(4)]
    prep = fake_prepare(tmp_path, base_dir, tvs)
    if identical:
        with pytest.warns(UserWarning, match="pool is degenerate"):
            expand.run(ExpandConfig(prepare=prep, out=tmp_path / "e", num_experts=6, checkpoints="all"), progress=False)
    else:
        expand.run(ExpandConfig(prepare=prep, out=tmp_path / "e", num_experts=6, checkpoints="all"), progress=False)
    diversity = json.loads((tmp_path / "e" / "manifest.json").read_text())["diversity"]
    assert diversity["degenerate"] is identical
    assert (diversity["checkpoint_cosine"]["max"] > 0.999) is identical


def test_router_pre_training_targets_by_hand():
    """Two tokens, two experts, one layer: each target's value from its definition."""
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.5]])

    class Model:
        def __call__(self, **inputs):
            return SimpleNamespace(loss=torch.tensor(3.0), router_logits=[logits])

    inputs = {"input_ids": torch.zeros(1, 2, dtype=torch.long), "attention_mask": torch.ones(1, 2)}
    sig = torch.sigmoid
    want = {
        "one_hot": ((-torch.log(sig(logits[:, 0])) - torch.log(1 - sig(logits[:, 1]))) / 2).mean(),
        "positive_only": (-torch.log(sig(logits[:, 0]))).mean(),
        "softmax": (-torch.log_softmax(logits, -1)[:, 0]).mean(),
    }
    for target, aux in want.items():
        got = router_loss(Model(), {**inputs, "owner": torch.tensor([0])}, 0.5, target, 2)
        assert got.item() == pytest.approx(0.5 * 3.0 + 0.5 * aux.item(), rel=1e-6), target
