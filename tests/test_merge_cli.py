"""`upcycle merge`: whole checkpoints merged tensor by tensor, checked against values computed
independently (hand-written formulas, peft.utils.merge_utils, DARE's definition); bad input refused
in one line with exit 2 and nothing written."""

import itertools
import shutil

import pytest
import torch
import yaml
from peft.utils import merge_utils
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from tests.test_safetensors_io import raw_safetensors
from upcycle.cli import main

WEIGHTS = (1.0, 0.5)


@pytest.fixture(scope="module")
def variants(llama_dir, tmp_path_factory):
    """Two 'fine-tuned' copies of the tiny llama: the base plus seeded noise."""
    root = tmp_path_factory.mktemp("variants")
    out = []
    for i in range(2):
        d = root / f"v{i}"
        shutil.copytree(llama_dir, d)
        state = load_file(d / "model.safetensors")
        g = torch.Generator().manual_seed(i)
        save_file({k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in state.items()}, d / "model.safetensors",
                  metadata={"format": "pt"})
        out.append(d)
    return out


def write_cfg(tmp_path, **cfg):
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump({k: (str(v) if hasattr(v, "__fspath__") else v) for k, v in cfg.items()}))
    return path


def merge(tmp_path, llama_dir, variants, method, weights=WEIGHTS, seed=3, **extra):
    out = tmp_path / f"merged-{method}"
    cfg = write_cfg(tmp_path, method=method, base=str(llama_dir), out=str(out), seed=seed,
                    models=[{"path": str(v), "weight": w} for v, w in zip(variants, weights)], **extra)
    assert main(["merge", str(cfg), "--quiet"]) == 0
    return load_file(out / "model.safetensors"), out


def states(llama_dir, variants):
    return load_file(llama_dir / "model.safetensors"), [load_file(v / "model.safetensors") for v in variants]


def test_linear_merge_is_the_weighted_average(llama_dir, variants, tmp_path):
    merged, out = merge(tmp_path, llama_dir, variants, "linear")
    _, (a, b) = states(llama_dir, variants)
    assert merged.keys() == a.keys()
    for name, value in merged.items():
        assert torch.allclose(value, (1.0 * a[name] + 0.5 * b[name]) / 1.5, atol=1e-6), name
    AutoModelForCausalLM.from_pretrained(out)  # a loadable model folder
    card = (out / "README.md").read_text()  # with a model card naming the method (export/model_card.py)
    assert card.startswith("---\n") and "linear" in card.split("---\n")[1]


def test_ties_merge_equals_peft(llama_dir, variants, tmp_path):
    merged, _ = merge(tmp_path, llama_dir, variants, "ties", density=0.7)
    base, models = states(llama_dir, variants)
    for name, value in merged.items():
        taus = [m[name] - base[name] for m in models]
        expected = base[name] + merge_utils.ties(taus, torch.tensor(WEIGHTS), 0.7, majority_sign_method="total")
        assert torch.allclose(value, expected, atol=1e-6), name


def recover_dare_masks(delta, scaled_taus, tol=1e-5):
    """DARE's definition: delta = sum_i k_i * s_i with k_i in {0, 1} drawn per entry. Find the k's; every
    entry must match one combination to `tol`. Returns the (M, numel) keep masks."""
    combos = torch.tensor(list(itertools.product([0.0, 1.0], repeat=len(scaled_taus))))  # (C, M)
    candidates = combos @ torch.stack([s.reshape(-1) for s in scaled_taus])  # (C, numel)
    residual = (candidates - delta.reshape(-1)).abs()
    best = residual.argmin(0)
    assert residual.min(0).values.max() <= tol, "an entry is no combination of the rescaled task vectors"
    return combos[best].T.bool()


@pytest.mark.parametrize("given", [{"density": 0.7}, {"drop_p": 0.3}, {"density": 0.7, "drop_p": 0.3}])
def test_dare_density_is_the_keep_fraction(llama_dir, variants, tmp_path, given):
    """density 0.7 = drop_p 0.3 (peft, mergekit): 70% of each task vector's entries survive, rescaled by 1/0.7."""
    merged, out = merge(tmp_path, llama_dir, variants, "dare", **given)
    base, models = states(llama_dir, variants)
    kept, total = torch.zeros(2), 0
    for name, value in merged.items():
        scaled = [w * (m[name] - base[name]) / 0.7 for w, m in zip(WEIGHTS, models)]
        masks = recover_dare_masks(value - base[name], scaled)
        kept += masks.sum(1)
        total += value.numel()
        if value.numel() > 1000:  # the two models' masks are drawn independently
            assert not torch.equal(masks[0], masks[1]), name
    # ~25k Bernoulli(0.7) draws per model: sd 0.003.
    assert torch.allclose(kept / total, torch.full((2,), 0.7), atol=0.015), kept / total
    recorded = yaml.safe_load((out / "upcycle_config.yaml").read_text())
    assert recorded["density"] == 0.7 and recorded["drop_p"] == pytest.approx(0.3)


def test_dare_ties_density_is_the_keep_fraction(llama_dir, variants, tmp_path):
    """One model: TIES's election keeps every surviving entry, so the result is base + w * mask * tau / density."""
    merged, _ = merge(tmp_path, llama_dir, variants[:1], "dare_ties", weights=(2.0,), density=0.8)
    base, (model,) = states(llama_dir, variants[:1])
    kept = total = 0
    for name, value in merged.items():
        masks = recover_dare_masks(value - base[name], [2.0 * (model[name] - base[name]) / 0.8])
        kept += masks.sum().item()
        total += value.numel()
    assert kept / total == pytest.approx(0.8, abs=0.015)


def test_same_seed_same_merge_other_seed_other_masks(llama_dir, variants, tmp_path):
    runs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        (tmp_path / name).mkdir()
        runs[name], _ = merge(tmp_path / name, llama_dir, variants, "dare", seed=seed)
    assert all(torch.equal(runs["a"][k], runs["b"][k]) for k in runs["a"])
    assert not torch.equal(runs["a"]["model.layers.0.mlp.up_proj.weight"], runs["c"]["model.layers.0.mlp.up_proj.weight"])


def test_models_with_different_shapes_or_keys_are_refused(llama_dir, variants, tmp_path, capsys):
    odd = tmp_path / "odd"
    shutil.copytree(variants[0], odd)
    state = load_file(odd / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(state, odd / "model.safetensors", metadata={"format": "pt"})
    cfg = write_cfg(tmp_path, method="ties", base=str(llama_dir), out=str(tmp_path / "o"),
                    models=[{"path": str(variants[0])}, {"path": str(odd)}])
    assert main(["merge", str(cfg), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "tensor model.layers.1.mlp.up_proj.weight has shape [3, 3]" in err and str(odd) in err
    assert not (tmp_path / "o").exists()

    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, odd / "model.safetensors", metadata={"format": "pt"})
    assert main(["merge", str(cfg), "--quiet"]) == 2
    assert "has no tensor model.layers.1.mlp.up_proj.weight" in capsys.readouterr().err


def refused(capsys, argv, out, *phrases):
    """Exit 2, one `upcycle: error:` line holding every phrase, and no output (nor temporary) folder."""
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("upcycle: error: "), lines
    for p in phrases:
        assert p in lines[0], lines[0]
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.tmp-*"))
    return lines[0]


def test_bad_merge_parameters(tmp_path, variants, capsys):
    out = tmp_path / "o"
    cfg = write_cfg(tmp_path, method="dare", out=str(out), base=str(variants[0]), drop_p=1.0, models=[{"path": str(variants[0])}])
    refused(capsys, ["merge", str(cfg)], out, "drop_p", "less than 1")
    cfg = write_cfg(tmp_path, method="ties", out=str(out), models=[{"path": str(variants[0])}])
    refused(capsys, ["merge", str(cfg)], out, "base: merge method ties takes task vectors against a base model")
    for method in ("dare", "dare_ties"):
        cfg = write_cfg(tmp_path, method=method, out=str(out), base=str(variants[0]), density=0.7, drop_p=0.5,
                        models=[{"path": str(variants[0])}])
        refused(capsys, ["merge", str(cfg)], out, "density=0.7 and drop_p=0.5 disagree", "keep fraction", "0.3")
    cfg = write_cfg(tmp_path, method="task_arithmetic", out=str(out), base=str(variants[0]),
                    models=[{"path": str(variants[0]), "weight": float("nan")}])
    refused(capsys, ["merge", str(cfg)], out, "models.0.weight", "finite")
    cfg = write_cfg(tmp_path, method="linear", out=str(out), models=[{"path": str(variants[0]), "weight": 1.0},
                                                                     {"path": str(variants[1]), "weight": -1.0}])
    refused(capsys, ["merge", str(cfg)], out, "models: the weights sum to 0", "normalize=false")


def test_a_merge_holding_nan_or_inf_is_refused_naming_the_tensor(llama_dir, variants, tmp_path, capsys):
    out = tmp_path / "o"
    # A NaN in one model's tensor.
    sick = tmp_path / "sick"
    shutil.copytree(variants[1], sick)
    state = load_file(sick / "model.safetensors")
    state["model.layers.1.self_attn.q_proj.weight"][0, 0] = float("nan")
    save_file(state, sick / "model.safetensors", metadata={"format": "pt"})
    cfg = write_cfg(tmp_path, method="task_arithmetic", base=str(llama_dir), out=str(out),
                    models=[{"path": str(variants[0])}, {"path": str(sick)}])
    # refused as it is read, naming the model's file and the tensor
    refused(capsys, ["merge", str(cfg), "--quiet"], out, str(sick / "model.safetensors"),
            "tensor 'model.layers.1.self_attn.q_proj.weight'", "NaN/inf")
    # Finite inputs whose merge overflows the output dtype: weights 1e7 and -1e7 in float16 (max 65504).
    cfg = write_cfg(tmp_path, method="task_arithmetic", base=str(llama_dir), out=str(out), dtype="float16",
                    models=[{"path": str(variants[0]), "weight": 1e7}, {"path": str(variants[1]), "weight": -1e7}])
    refused(capsys, ["merge", str(cfg), "--quiet"], out, "NaN/inf", "float16")


def damaged_copy(llama_dir, tmp_path, damage):
    """A copy of the tiny llama whose model.safetensors is damaged as named."""
    d = tmp_path / f"damaged-{damage}"
    shutil.copytree(llama_dir, d)
    path = d / "model.safetensors"
    if damage == "negative shape":
        raw_safetensors(path, {"model.norm.weight": {"dtype": "F32", "shape": [-4, -8], "data_offsets": [0, 128]}}, bytes(128))
    elif damage == "nested JSON":
        raw_safetensors(path, b'{"model.norm.weight": ' + b"[" * 10000 + b"]" * 10000 + b"}")
    elif damage == "offsets":
        raw_safetensors(path, {"model.norm.weight": {"dtype": "F32", "shape": [32], "data_offsets": [0, 128]},
                               "lm_head.weight": {"dtype": "F32", "shape": [32], "data_offsets": [64, 192]}}, bytes(192))
    else:  # quantized weights: int8 or float8, as a quantized checkpoint stores them
        state = load_file(path)
        state["model.layers.0.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"].to(
            {"I8": torch.int8, "F8_E4M3": torch.float8_e4m3fn}[damage])
        save_file(state, path, metadata={"format": "pt"})
    return d, path


DAMAGES = {"negative shape": ["'model.norm.weight'", "shape [-4, -8]"], "nested JSON": ["nested too deeply"],
           "offsets": ["'lm_head.weight' starts at byte 64 but tensor 'model.norm.weight' ends at byte 128", "overlap"],
           "I8": ["'model.layers.0.mlp.up_proj.weight' is stored as I8", "dequantize"],
           "F8_E4M3": ["'model.layers.0.mlp.up_proj.weight' is stored as F8_E4M3", "dequantize"]}


@pytest.mark.parametrize("damage", list(DAMAGES))
@pytest.mark.parametrize("command", ["build", "merge"])
def test_damaged_or_quantized_weights_exit_2_writing_nothing(llama_dir, variants, tmp_path, capsys, command, damage):
    bad, path = damaged_copy(llama_dir, tmp_path, damage)
    out = tmp_path / "out"
    if command == "build":
        argv = ["build", "--quiet", "--base", str(bad), "--out", str(out), "--num-experts", "4", "--top-k", "2"]
    else:  # the damaged folder as the base of one merge, as a model of another
        argv = ["merge", "--quiet", str(write_cfg(tmp_path, method="ties", base=str(bad), out=str(out),
                                                  models=[{"path": str(variants[0])}]))]
        refused(capsys, argv, out, str(path), *DAMAGES[damage])
        argv = ["merge", "--quiet", str(write_cfg(tmp_path, method="linear", out=str(out),
                                                  models=[{"path": str(variants[0])}, {"path": str(bad)}]))]
    refused(capsys, argv, out, str(path), *DAMAGES[damage])
