"""Stage 2 `expand`: parent choice, determinism, LoRA merging in delta space, lineage, bad input."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from upcycle.config import ExpandConfig
from upcycle.errors import UpcycleError
from upcycle.experts import open_expert
from upcycle.merge import ops
from upcycle.seeding import generator
from upcycle.stages import expand

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
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
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
    (root / "manifest.json").write_text(json.dumps({"stage": "prepare", "complete": True, "base": str(base_dir),
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


def test_child_follows_the_dare_definition_and_grows_the_pool(tmp_path, base_dir):
    prep = fake_prepare(tmp_path, base_dir, [random_tv(s) for s in range(4)])
    cfg = ExpandConfig(prepare=prep, out=tmp_path / "out", num_experts=7, checkpoints="all", seed=5, drop_p=0.3)
    summary = expand.run(cfg, progress=False)
    assert summary["experts"] == 7 and summary["children"] == 3
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    rounds = manifest["lineage"]
    # children can be parents: the pool grows, and round r sees an (4 + r)-square similarity matrix
    assert [len(r["similarity_before"]) for r in rounds] == [4, 5, 6]
    base = load_file(base_dir / "model.safetensors")
    pool = [open_expert(e["path"]) for e in manifest["experts"]]
    r = rounds[0]
    j, k = r["parents"]
    for l in range(L):
        for p in PROJS:
            name = mlp_name(l, p)
            tj = pool[j].tau((l, p), base[name]).reshape(-1)
            tk = pool[k].tau((l, p), base[name]).reshape(-1)
            expected = (r["alpha"] * ops.dare(tj, 0.3, generator(5, "expand", 0, name, "j"))
                        + (1 - r["alpha"]) * ops.dare(tk, 0.3, generator(5, "expand", 0, name, "k")))
            got = pool[4].tau((l, p), base[name]).reshape(-1)
            assert torch.allclose(got, expected, atol=1e-5)


def test_same_seed_same_experts_other_seed_other_children(tmp_path, base_dir):
    prep = fake_prepare(tmp_path, base_dir, [random_tv(s) for s in range(3)])
    runs = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        expand.run(ExpandConfig(prepare=prep, out=tmp_path / name, num_experts=5, checkpoints="all", seed=seed), progress=False)
        m = json.loads((tmp_path / name / "manifest.json").read_text())
        runs[name] = ([e["sha256"] for e in m["experts"]], [(r["parents"], r["alpha"]) for r in m["lineage"]])
    assert runs["a"] == runs["b"]
    assert runs["a"][0][3:] != runs["c"][0][3:] and runs["a"][1] != runs["c"][1]


def test_random_parents_and_per_layer_options(tmp_path, base_dir):
    prep = fake_prepare(tmp_path, base_dir, [random_tv(s) for s in range(4)])
    expand.run(ExpandConfig(prepare=prep, out=tmp_path / "r", num_experts=6, checkpoints="all", parents="random"), progress=False)
    expand.run(ExpandConfig(prepare=prep, out=tmp_path / "p", num_experts=5, checkpoints="all", per_layer=True,
                            similarity="l2"), progress=False)
    rounds = json.loads((tmp_path / "r" / "lineage.json").read_text())["rounds"]
    assert all(r["parent_choice"] == "random" for r in rounds)
    per_layer = json.loads((tmp_path / "p" / "lineage.json").read_text())["rounds"][0]["parents"]
    assert isinstance(per_layer, (list, dict))


def test_lora_children_merge_in_delta_space(tmp_path, base_dir):
    rank = 2

    def lora_tv(seed):
        def tv(l, p):
            g = torch.Generator().manual_seed(seed * 100 + l * 10 + PROJS.index(p))
            out_dim, in_dim = shape(p)
            return torch.randn(rank, in_dim, generator=g), torch.randn(out_dim, rank, generator=g)
        return tv

    prep = fake_prepare(tmp_path, base_dir, [lora_tv(s) for s in range(3)], lora=rank)
    # Exact storage: rank >= min(in, out) = 8 keeps the full merged delta.
    expand.run(ExpandConfig(prepare=prep, out=tmp_path / "exact", num_experts=4, checkpoints="all", lora_child_rank=8, seed=3),
               progress=False)
    # Default: the parents' rank, an SVD approximation with its error recorded.
    expand.run(ExpandConfig(prepare=prep, out=tmp_path / "approx", num_experts=4, checkpoints="all", seed=3), progress=False)
    for name in ("exact", "approx"):
        m = json.loads((tmp_path / name / "manifest.json").read_text())
        r = m["lineage"][0]
        pool = [open_expert(e["path"]) for e in m["experts"]]
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
