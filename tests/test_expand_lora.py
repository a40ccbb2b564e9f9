"""LoRA children of UpIT's expansion keep their DARE mutation (lora_merge factors, the default), the
concatenated-factor option is exactly the merge of the parents' DARE'd deltas, and the manifest
records per child its cosine to the plain alpha-mix of its parents and the norm storage kept.

Parents are three checkpoints of one imagined LoRA run: a shared (A, B) plus a little noise each
(task-vector cosines about 0.95), at 64 x 48 with rank 8, where an SVD back to the parents' rank
visibly smooths DARE's mask away."""

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from tests.test_merge_cli import recover_dare_masks
from upcycle.config import ExpandConfig
from upcycle.experts import open_expert
from upcycle.manifest import resolve_path
from upcycle.stages import expand

PROJS = ("gate_proj", "up_proj", "down_proj")
H, I, L, R, ALPHA = 48, 64, 2, 8, 16.0
KEYS = [(l, p) for l in range(L) for p in PROJS]


def shape(p):
    return (H, I) if p == "down_proj" else (I, H)


@pytest.fixture
def prepared(tmp_path):
    """A base folder and a finished LoRA prepare folder with three related checkpoints."""
    base = tmp_path / "base"
    base.mkdir()
    g = torch.Generator().manual_seed(0)
    save_file({f"model.layers.{l}.mlp.{p}.weight": torch.randn(shape(p), generator=g) for l, p in KEYS},
              base / "model.safetensors", metadata={"format": "pt"})
    (base / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 16, "hidden_size": H,
                                                  "intermediate_size": I, "num_hidden_layers": L, "num_attention_heads": 2}))
    root = tmp_path / "prepare"
    shared = {k: (torch.randn(R, shape(k[1])[1], generator=g), torch.randn(shape(k[1])[0], R, generator=g)) for k in KEYS}
    entries = []
    for i in range(3):
        ck = root / "checkpoints" / f"checkpoint-{i}"
        ck.mkdir(parents=True)
        state = {}
        for (l, p), (a, b) in shared.items():
            prefix = f"base_model.model.model.layers.{l}.mlp.{p}"
            state[f"{prefix}.lora_A.weight"] = a + 0.1 * torch.randn(a.shape, generator=g)
            state[f"{prefix}.lora_B.weight"] = b + 0.2 * torch.randn(b.shape, generator=g)
        save_file(state, ck / "adapter_model.safetensors", metadata={"format": "pt"})
        (ck / "adapter_config.json").write_text(json.dumps({"r": R, "lora_alpha": ALPHA, "target_modules": list(PROJS)}))
        entries.append({"index": i, "step": i + 1, "epoch": (i + 1) / 2, "path": f"checkpoints/checkpoint-{i}", "sha256": str(i)})
    (root / "manifest.json").write_text(json.dumps({"stage": "prepare", "config_hash": "made-by-test", "complete": True,
                                                    "mode": "lora", "base": str(base), "checkpoints": entries}))
    return root


def child_of(out):
    """(the pool, the first round's record, the child) of an expand folder."""
    m = json.loads((out / "manifest.json").read_text())
    pool = [open_expert(resolve_path(e["path"], out)) for e in m["experts"]]
    return pool, m["lineage"][0], pool[len(pool) - 1]


def cosine_to_mix(pool, record, child) -> float:
    """cos(child's delta, alpha dW_j + (1 - alpha) dW_k) over every key, from the files alone."""
    j, k = record["parents"]
    a = record["alpha"]
    dot = nc = nm = 0.0
    for key in KEYS:
        mix = a * pool[j].tau(key) + (1 - a) * pool[k].tau(key)
        got = child.tau(key)
        dot, nc, nm = dot + float((got * mix).sum()), nc + float((got * got).sum()), nm + float((mix * mix).sum())
    return dot / math.sqrt(nc * nm)


def test_factor_children_keep_the_dare_mutation_that_an_svd_back_to_rank_removes(prepared, tmp_path):
    cosines = {}
    for mode in ("factors", "delta_svd"):
        out = tmp_path / mode
        expand.run(ExpandConfig(prepare=prepared, out=out, num_experts=4, checkpoints="all", seed=3, lora_merge=mode),
                   progress=False)
        pool, record, child = child_of(out)
        cosines[mode] = cosine_to_mix(pool, record, child)
        assert record["cosine_to_mix"] == pytest.approx(cosines[mode], rel=1e-5)  # what the manifest records
        assert child.rank == R and child.scaling == pytest.approx(ALPHA / R)  # the parents' rank and scale
    # DARE with p = 0.5 on the factors leaves the child far from the plain mix; the SVD smooths it back.
    assert cosines["factors"] < 0.85 < cosines["delta_svd"], cosines
    _, record, _ = child_of(tmp_path / "delta_svd")
    assert record["norm_kept"] < 0.95 and record["svd_relative_error_max"] > 0.3
    _, record, _ = child_of(tmp_path / "factors")
    assert record["norm_kept"] == pytest.approx(1.0)


def test_factor_children_are_a_dare_of_each_parent_factor(prepared, tmp_path):
    """Every entry of the child's A (and B) is a combination of alpha A_j / (1 - p) and beta A_k / (1 - p)
    kept or dropped; about half of each parent's entries survive (p = 0.5)."""
    out = tmp_path / "f"
    expand.run(ExpandConfig(prepare=prepared, out=out, num_experts=4, checkpoints="all", seed=3), progress=False)
    pool, record, child = child_of(out)
    j, k = record["parents"]
    a = record["alpha"]
    for key in KEYS:
        for which in (0, 1):  # A, then B
            parents = [pool[j].factors(key)[which], pool[k].factors(key)[which]]
            masks = recover_dare_masks(child.factors(key)[which], [2 * a * parents[0], 2 * (1 - a) * parents[1]])
            assert 0.35 < masks.float().mean() < 0.65


def test_concat_children_are_exactly_the_merge_of_the_parents_dared_deltas(prepared, tmp_path):
    out = tmp_path / "c"
    expand.run(ExpandConfig(prepare=prepared, out=out, num_experts=4, checkpoints="all", seed=3, lora_merge="concat"),
               progress=False)
    pool, record, child = child_of(out)
    j, k = record["parents"]
    a = record["alpha"]
    assert child.rank == 2 * R and child.scaling == pytest.approx(ALPHA / R)
    for key in KEYS:
        ca, cb = child.factors(key)
        dropped = []
        for half, parent, w in ((slice(0, R), pool[j], a), (slice(R, 2 * R), pool[k], 1 - a)):
            pa, pb = parent.factors(key)
            # each half holds the parent's own factors, DARE'd: kept entries doubled (p = 0.5), the rest 0
            keep_a, keep_b = ca[half] != 0, cb[:, half] != 0
            assert torch.allclose(ca[half], 2 * pa * keep_a, atol=1e-6)
            assert torch.allclose(cb[:, half], w * 2 * pb * keep_b, atol=1e-6)
            dropped.append(parent.scaling * (2 * pb * keep_b) @ (2 * pa * keep_a))
        want = a * dropped[0] + (1 - a) * dropped[1]  # the full-delta merge of the DARE'd parents
        assert torch.allclose(child.tau(key), want, atol=1e-5, rtol=1e-5)


def test_concat_without_dropping_is_the_plain_mix(prepared, tmp_path):
    out = tmp_path / "c0"
    expand.run(ExpandConfig(prepare=prepared, out=out, num_experts=4, checkpoints="all", seed=3, lora_merge="concat",
                            drop_p=0.0), progress=False)
    pool, record, child = child_of(out)
    j, k = record["parents"]
    for key in KEYS:
        want = record["alpha"] * pool[j].tau(key) + (1 - record["alpha"]) * pool[k].tau(key)
        assert torch.allclose(child.tau(key), want, atol=1e-5, rtol=1e-5)
    assert record["cosine_to_mix"] == pytest.approx(1.0, abs=1e-9)


def test_lora_child_rank_is_only_for_delta_svd():
    with pytest.raises(ValueError, match="lora_child_rank: only used with lora_merge=delta_svd"):
        ExpandConfig(lora_child_rank=4)


def test_the_factor_space_gram_equals_the_materialized_deltas():
    g = torch.Generator().manual_seed(0)
    factors = [(torch.randn(r, 7, generator=g), torch.randn(5, r, generator=g), s) for r, s in ((3, 2.0), (2, 0.5), (4, 1.0))]
    deltas = [s * (b @ a) for a, b, s in factors]
    want = torch.tensor([[float((x * y).sum()) for y in deltas] for x in deltas], dtype=torch.float64)
    assert torch.allclose(expand.lora_gram(factors), want, rtol=1e-6)
