"""Stage 2 `expand`: parent choice, determinism, LoRA merging in delta space, lineage, bad input."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from upcycle.config import ExpandConfig
from upcycle.errors import UpcycleError
from upcycle.experts import open_expert
from upcycle.manifest import resolve_path
from upcycle.merge import ops
from upcycle.seeding import generator
from upcycle.stages import expand
from tests.test_merge_cli import recover_dare_masks

PROJS = ("gate_proj", "up_proj", "down_proj")
H, I, L = 8, 12, 2


def mlp_name(l, p):
    return f"model.layers.{l}.mlp.{p}.weight"


def shape(p):
    return (H, I) if p == "down_proj" else (I, H)


@pytest.fixture
def base_dir(tmp_path):
    d = tmp_path / "base"
    d.mkdir()
    g = torch.Generator().manual_seed(0)
    save_file({mlp_name(l, p): torch.randn(shape(p), generator=g) for l in range(L) for p in PROJS},
              d / "model.safetensors", metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 16, "hidden_size": H,
                                               "intermediate_size": I, "num_hidden_layers": L, "num_attention_heads": 2}))
    return d


def fake_prepare(tmp_path, base_dir, task_vectors, lora=None):
    """A finished prepare folder whose checkpoint i has MLP task vector task_vectors[i] (a function of (l, p))."""
    root = tmp_path / "prepare"
    base = load_file(base_dir / "model.safetensors")
    entries = []
    for i, tv in enumerate(task_vectors):
        ck = root / "checkpoints" / f"checkpoint-{i}"
        ck.mkdir(parents=True)
        if lora is None:
            save_file({n: base[n] + tv(l, p) for l in range(L) for p in PROJS for n in [mlp_name(l, p)]},
                      ck / "model.safetensors", metadata={"format": "pt"})
        else:
            rank = lora
            state = {}
            for l in range(L):
                for p in PROJS:
                    a, b = tv(l, p)
                    prefix = f"base_model.model.model.layers.{l}.mlp.{p}"
                    state[f"{prefix}.lora_A.weight"], state[f"{prefix}.lora_B.weight"] = a, b
            save_file(state, ck / "adapter_model.safetensors", metadata={"format": "pt"})
            (ck / "adapter_config.json").write_text(json.dumps({"r": rank, "lora_alpha": 2 * rank, "target_modules": list(PROJS)}))
        entries.append({"index": i, "step": i + 1, "epoch": (i + 1) / 4, "path": f"checkpoints/checkpoint-{i}", "sha256": str(i)})
    (root / "manifest.json").write_text(json.dumps({"stage": "prepare", "config_hash": "made-by-test", "complete": True,
                                                    "mode": "lora" if lora else "full", "base": str(base_dir),
                                                    "checkpoints": entries}))
    return root


def random_tv(seed):
    def tv(l, p):
        return torch.randn(shape(p), generator=torch.Generator().manual_seed(seed * 100 + l * 10 + PROJS.index(p)))
    return tv


def test_most_dissimilar_pair_is_chosen(tmp_path, base_dir):
    """tau_0 = v, tau_1 = v + small noise, tau_2 = -v + small noise, tau_3 = orthogonal-ish: (0, 2) is the least similar."""
    v, w = random_tv(1), random_tv(2)
    small = random_tv(3)
    tvs = [v, lambda l, p: v(l, p) + 0.1 * small(l, p), lambda l, p: -v(l, p) + 0.1 * small(l, p), w]
    prep = fake_prepare(tmp_path, base_dir, tvs)
    cfg = ExpandConfig(prepare=prep, out=tmp_path / "out", num_experts=5, checkpoints="all")
    expand.run(cfg, progress=False)
    lineage = json.loads((tmp_path / "out" / "lineage.json").read_text())
    assert lineage["rounds"][0]["parents"] == [0, 2]
    sim = torch.tensor(lineage["rounds"][0]["similarity_before"])
    assert sim[0, 2] < -0.9 and sim[0, 1] > 0.9
    assert (tmp_path / "out" / "similarity.png").stat().st_size > 1000


def check_children(out, base_dir, drop_p):
    """Every child against the definition tau_child = DARE(alpha tau_j) + DARE((1 - alpha) tau_k), with the
    parents the lineage names (per layer when it names them per layer): each entry must be one of 0,
    alpha tau_j / (1-p), (1-alpha) tau_k / (1-p) or their sum. Returns the keep masks, (2, entries) over all
    children, for their statistics."""
    manifest = json.loads((out / "manifest.json").read_text())
    base = load_file(base_dir / "model.safetensors")
    weights = [load_file(next(iter(sorted(resolve_path(e["path"], out).glob("*.safetensors"))))) for e in manifest["experts"]]
    masks = []
    for r in manifest["lineage"]:
        assert 0 < r["alpha"] < 1 and r["drop_p"] == drop_p
        for l in range(L):
            j, k = r["parents"][str(l)] if isinstance(r["parents"], dict) else r["parents"]
            for p in PROJS:
                n = mlp_name(l, p)
                tj, tk, child = (weights[i][n] - base[n] for i in (j, k, r["child"]))
                masks.append(recover_dare_masks(child, [r["alpha"] * tj / (1 - drop_p), (1 - r["alpha"]) * tk / (1 - drop_p)],
                                                tol=1e-4))
    return torch.cat(masks, dim=1)


def test_children_follow_the_dare_definition_and_grow_the_pool(tmp_path, base_dir):
    prep = fake_prepare(tmp_path, base_dir, [random_tv(s) for s in range(4)])
    cfg = ExpandConfig(prepare=prep, out=tmp_path / "out", num_experts=7, checkpoints="all", seed=5, drop_p=0.3)
    summary = expand.run(cfg, progress=False)
    assert summary["experts"] == 7 and summary["children"] == 3
    rounds = json.loads((tmp_path / "out" / "manifest.json").read_text())["lineage"]
    # children can be parents: the pool grows, and round r sees an (4 + r)-square similarity matrix
    assert [len(r["similarity_before"]) for r in rounds] == [4, 5, 6] and [r["child"] for r in rounds] == [4, 5, 6]
    assert len({r["alpha"] for r in rounds}) == 3  # a fresh alpha ~ U(0, 1) per child
    masks = check_children(tmp_path / "out", base_dir, 0.3)
    # 3 children x 576 entries per parent: each keeps 1 - p = 0.7 (sd 0.011), the two masks independently (0.49).
    assert torch.allclose(masks.float().mean(1), torch.tensor([0.7, 0.7]), atol=0.045)
    assert (masks[0] & masks[1]).float().mean().item() == pytest.approx(0.49, abs=0.05)


def test_same_seed_same_experts_other_seed_other_children(tmp_path, base_dir):
    prep = fake_prepare(tmp_path, base_dir, [random_tv(s) for s in range(3)])
    runs = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        expand.run(ExpandConfig(prepare=prep, out=tmp_path / name, num_experts=5, checkpoints="all", seed=seed), progress=False)
        m = json.loads((tmp_path / name / "manifest.json").read_text())
        runs[name] = ([e["sha256"] for e in m["experts"]], [(r["parents"], r["alpha"]) for r in m["lineage"]])
    assert runs["a"] == runs["b"]
    assert runs["a"][0][3:] != runs["c"][0][3:] and runs["a"][1] != runs["c"][1]


def test_per_layer_parents_are_each_layers_most_distant_pair(tmp_path, base_dir):
    """Layer 0: tau = a, a + b, a + 10b (farthest: 0 and 2); layer 1: a, a + 10b, a + b (farthest: 0 and 1).
    Over both layers the farthest pair is (1, 2), so a per-layer choice differs from the global one in each layer."""
    a, b = random_tv(1), random_tv(2)
    steps = {0: (0, 1, 10), 1: (0, 10, 1)}
    tvs = [lambda l, p, i=i: a(l, p) + steps[l][i] * b(l, p) for i in range(3)]
    prep = fake_prepare(tmp_path, base_dir, tvs)
    for per_layer, expected in ((True, {"0": [0, 2], "1": [0, 1]}), (False, [1, 2])):
        out = tmp_path / f"per_layer_{per_layer}"
        expand.run(ExpandConfig(prepare=prep, out=out, num_experts=4, checkpoints="all", per_layer=per_layer,
                                similarity="l2"), progress=False)
        (record,) = json.loads((out / "lineage.json").read_text())["rounds"]
        assert record["parents"] == expected and record["metric"] == "l2"
        check_children(out, base_dir, 0.5)  # each layer's child made from that layer's parents


def test_random_parents_are_drawn_by_seed_not_by_similarity(tmp_path, base_dir):
    prep = fake_prepare(tmp_path, base_dir, [random_tv(s) for s in range(4)])
    pairs = {}
    for name, parents, seed in (("greedy", "most_dissimilar", 0), ("r0", "random", 0), ("r0again", "random", 0),
                                ("r1", "random", 1)):
        expand.run(ExpandConfig(prepare=prep, out=tmp_path / name, num_experts=7, checkpoints="all", parents=parents,
                                seed=seed), progress=False)
        rounds = json.loads((tmp_path / name / "lineage.json").read_text())["rounds"]
        assert all(r["parent_choice"] == parents for r in rounds)
        pairs[name] = [tuple(r["parents"]) for r in rounds]
        assert all(0 <= i < j < 4 + r for r, (i, j) in enumerate(pairs[name]))  # two distinct experts of the pool then
        check_children(tmp_path / name, base_dir, 0.5)
    assert pairs["r0"] == pairs["r0again"]
    assert pairs["r0"] != pairs["greedy"] and pairs["r1"] != pairs["r0"]


def test_delta_svd_children_merge_in_delta_space(tmp_path, base_dir):
    rank = 2

    def lora_tv(seed):
        def tv(l, p):
            g = torch.Generator().manual_seed(seed * 100 + l * 10 + PROJS.index(p))
            out_dim, in_dim = shape(p)
            return torch.randn(rank, in_dim, generator=g), torch.randn(out_dim, rank, generator=g)
        return tv

    prep = fake_prepare(tmp_path, base_dir, [lora_tv(s) for s in range(3)], lora=rank)
    # Exact storage: rank >= min(in, out) = 8 keeps the full merged delta.
    expand.run(ExpandConfig(prepare=prep, out=tmp_path / "exact", num_experts=4, checkpoints="all", lora_child_rank=8, seed=3,
                            lora_merge="delta_svd"), progress=False)
    # At the parents' rank: an SVD approximation with its error recorded.
    expand.run(ExpandConfig(prepare=prep, out=tmp_path / "approx", num_experts=4, checkpoints="all", seed=3,
                            lora_merge="delta_svd"), progress=False)
    for name in ("exact", "approx"):
        m = json.loads((tmp_path / name / "manifest.json").read_text())
        r = m["lineage"][0]
        pool = [open_expert(resolve_path(e["path"], tmp_path / name)) for e in m["experts"]]
        j, k = r["parents"]
        errors = []
        for l in range(L):
            for p in PROJS:
                n = mlp_name(l, p)
                # the definition: dW = (alpha_lora / r) B A; child dW = DARE(a dW_j) + DARE((1-a) dW_k)
                dj, dk = [pool[i].scaling * (pool[i].factors((l, p))[1] @ pool[i].factors((l, p))[0]) for i in (j, k)]
                want = (r["alpha"] * ops.dare(dj.reshape(-1), 0.5, generator(3, "expand", 0, n, "j"))
                        + (1 - r["alpha"]) * ops.dare(dk.reshape(-1), 0.5, generator(3, "expand", 0, n, "k"))).reshape(dj.shape)
                got = pool[3].tau((l, p))
                errors.append(((got - want).norm() / want.norm()).item())
        if name == "exact":
            assert max(errors) < 1e-5 and r["svd_relative_error_max"] < 1e-5
        else:
            assert r["svd_relative_error_max"] == pytest.approx(max(errors), rel=1e-4)
            assert 0.05 < max(errors) < 1  # rank 2 of a DARE'd full-rank delta: a real, stated approximation


def test_no_expansion_uses_checkpoints_and_errors_when_too_few(tmp_path, base_dir):
    prep = fake_prepare(tmp_path, base_dir, [random_tv(s) for s in range(8)])
    s = expand.run(ExpandConfig(prepare=prep, out=tmp_path / "o", num_experts=8, checkpoints="all", expansion=False), progress=False)
    assert s["children"] == 0 and s["experts"] == 8
    with pytest.raises(UpcycleError, match="expansion is off but checkpoints='second_half' selects only 4"):
        expand.run(ExpandConfig(prepare=prep, out=tmp_path / "o2", num_experts=8, expansion=False), progress=False)


def test_bad_input(tmp_path, base_dir):
    prep = fake_prepare(tmp_path, base_dir, [random_tv(s) for s in range(4)])
    with pytest.raises(UpcycleError, match="num_experts: 2 is below the pool size 4"):
        expand.run(ExpandConfig(prepare=prep, out=tmp_path / "o", num_experts=2, checkpoints="all"), progress=False)
    with pytest.raises(Exception, match="drop_p"):
        ExpandConfig(prepare=prep, out=tmp_path / "o", drop_p=1.0)
    # a checkpoint with a different shape: the error names the tensor
    odd = prep / "checkpoints" / "checkpoint-3" / "model.safetensors"
    state = load_file(odd)
    state[mlp_name(1, "up_proj")] = torch.zeros(5, H)
    save_file(state, odd, metadata={"format": "pt"})
    with pytest.raises(UpcycleError, match=r"model.layers.1.mlp.up_proj.weight has shape \[5, 8\]"):
        expand.run(ExpandConfig(prepare=prep, out=tmp_path / "o", num_experts=6, checkpoints="all"), progress=False)
    # a missing tensor
    del state[mlp_name(1, "up_proj")]
    save_file(state, odd, metadata={"format": "pt"})
    with pytest.raises(UpcycleError, match=r"has no tensor for model.layers.1.mlp.up_proj.weight"):
        expand.run(ExpandConfig(prepare=prep, out=tmp_path / "o", num_experts=6, checkpoints="all"), progress=False)
    # a base that does not match the experts
    shutil.rmtree(prep / "checkpoints" / "checkpoint-3")
    manifest = json.loads((prep / "manifest.json").read_text())
    manifest["checkpoints"] = manifest["checkpoints"][:3]
    (prep / "manifest.json").write_text(json.dumps(manifest))
    other = load_file(base_dir / "model.safetensors")
    other[mlp_name(0, "gate_proj")] = torch.zeros(I + 4, H)
    save_file(other, base_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UpcycleError, match=r"base: model.layers.0.mlp.gate_proj.weight has shape \[16, 8\]"):
        expand.run(ExpandConfig(prepare=prep, out=tmp_path / "o", num_experts=6, checkpoints="all"), progress=False)
