"""`upcycle merge`: whole checkpoints merged tensor by tensor, equal to the in-memory math; bad input refused."""

import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from upcycle.cli import main
from upcycle.merge.methods import METHODS, MergeParams, merge_tensor
from upcycle.seeding import generator


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


@pytest.mark.parametrize("method", ["ties", "dare", "linear"])
def test_cli_merge_equals_in_memory_merge(llama_dir, variants, tmp_path, capsys, method):
    out = tmp_path / "merged"
    cfg = write_cfg(tmp_path, method=method, base=str(llama_dir), out=str(out), seed=3, density=0.7, drop_p=0.3,
                    models=[{"path": str(variants[0]), "weight": 1.0}, {"path": str(variants[1]), "weight": 0.5}])
    assert main(["merge", str(cfg), "--quiet"]) == 0
    merged = load_file(out / "model.safetensors")
    base = load_file(llama_dir / "model.safetensors")
    models = [load_file(v / "model.safetensors") for v in variants]
    params = MergeParams(weights=(1.0, 0.5), density=0.7, drop_p=0.3)
    for name, value in merged.items():
        gens = [generator(3, "merge", name, i) for i in range(2)]
        expected = merge_tensor(METHODS[method], base[name] if method != "linear" else None,
                                [m[name] for m in models], params, gens)
        assert torch.equal(value, expected), name
    AutoModelForCausalLM.from_pretrained(out)  # a loadable model folder


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


def test_bad_merge_parameters(tmp_path, variants, capsys):
    cfg = write_cfg(tmp_path, method="dare", out=str(tmp_path / "o"), drop_p=1.0, models=[{"path": str(variants[0])}])
    assert main(["merge", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "drop_p" in err and "less than 1" in err
    cfg = write_cfg(tmp_path, method="ties", out=str(tmp_path / "o"), models=[{"path": str(variants[0])}])
    assert main(["merge", str(cfg)]) == 2
    assert "base: merge method ties takes task vectors against a base model" in capsys.readouterr().err
