"""Every recipe validates, and a tiny version of each runs end to end (tiny model, tiny data)."""

import json
from pathlib import Path

import pytest

from upcycle.cli import main
from upcycle.config_io import load_config
from upcycle.manifest import resolve_path
from upcycle.pipeline import RunConfig, stage_configs

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
TINY = ["data.max_length=64", "data.eval_fraction=0.1", "evaluate=false",
        "prepare.train.epochs=2", "prepare.train.batch_size=8", "prepare.save_every=0.25", "route.seed_count=8", "route.train.epochs=1",
        "route.train.batch_size=4", "post_train.train.batch_size=4", "post_train.train.epochs=0.5", "post_train.save_every=0.5",
        "branch.train.epochs=1", "branch.train.batch_size=8"]


def test_there_are_recipes_for_every_method():
    names = {p.stem for p in RECIPES}
    assert {"upit_lora", "upit_ffn", "dense_sft", "dense_lora", "upcycle_sft", "upcycle_pt", "loramoe_sft",
            "ablation_no_router_init", "ablation_random_buckets", "ablation_random_parents", "ablation_no_expansion",
            "ablation_first_half", "nvidia_granular", "drop_upcycling", "self_moe", "btx"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_validates(recipe, capsys):
    cfg = load_config(RunConfig, recipe)
    cfgs = stage_configs(cfg)
    assert list(cfgs) == cfg.stages
    assert main(["validate", str(recipe)]) == 0
    assert "ok (RunConfig)" in capsys.readouterr().out


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("recipe-data") / "train.jsonl"
    rows = [{"instruction": f"add {i} and {i + 1}", "output": f"{2 * i + 1}", "domain": ("math", "code")[i % 2]} for i in range(40)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_tiny_recipe_runs_end_to_end(recipe, llama_dir, tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["run", str(recipe), "--quiet", f"base={llama_dir}", f"data.train=[{tiny_data}]", f"out={out}", *TINY])
    assert code == 0, capsys.readouterr().err
    record = json.loads((out / "run.json").read_text())
    cfg = load_config(RunConfig, recipe)
    assert list(record["stages"]) == cfg.stages and all(s["status"] == "done" for s in record["stages"].values())
    if "post_train" in cfg.stages:
        from transformers import AutoConfig
        model = out / "post_train" / "model"
        if (model / "config.json").exists():  # a native format: loads in stock transformers
            assert AutoConfig.from_pretrained(model).model_type in ("mixtral", "qwen2_moe", "qwen3_moe")
        else:
            assert (model / "upcycle_moe.json").exists()


@pytest.mark.parametrize("recipe", ["self_moe", "btx"])
def test_mixed_recipes_record_lineage_and_freeze_what_they_say(recipe, llama_dir, tiny_data, tmp_path, capsys):
    """Each expert saw its domain's rows only (lineage), the MoE has one expert per domain, and
    Self-MoE's post-training moved only the routers (base and experts frozen)."""
    import torch
    from safetensors.torch import load_file

    from upcycle.export.load import load_moe

    out = tmp_path / "run"
    path = Path(__file__).resolve().parents[1] / "recipes" / f"{recipe}.yaml"
    assert main(["run", str(path), "--quiet", f"base={llama_dir}", f"data.train=[{tiny_data}]", f"out={out}", *TINY]) == 0, \
        capsys.readouterr().err
    branch = json.loads((out / "branch" / "manifest.json").read_text())
    assert [d["domain"] for d in branch["domains"]] == ["code", "math"]
    for d in branch["domains"]:
        rows = [json.loads(line) for line in resolve_path(d["data"], out / "branch").read_text().splitlines()]
        assert len(rows) == d["rows"] > 0 and {r["domain"] for r in rows} == {d["domain"]}
    assert sum(d["rows"] for d in branch["domains"]) == 36  # the 40 rows less the 10% eval split, each in one expert
    mixed, trained = load_moe(out / "mix" / "model"), load_moe(out / "post_train" / "model")
    assert trained.upcycle_spec.num_experts == 2 and trained.upcycle_spec.top_k == 2
    from upcycle.moe.model import moe_blocks

    def weights(model):  # materialized experts: the post-trained LoRA MoE is exported as W + dW
        state = {k: v for k, v in model.state_dict().items() if ".mlp." not in k}
        for l, block in moe_blocks(model):
            state[f"{l}.router"] = block.router.weight
            for e in range(block.spec.num_experts):
                state.update({f"{l}.{e}.{p}": w for p, w in block.experts.expert(e).as_dict().items()})
        return state

    before, after = weights(mixed), weights(trained)
    moved = {k for k in before if not torch.allclose(before[k].float(), after[k].float(), atol=1e-6)}
    assert moved and all(k.endswith("router") for k in moved) == (recipe == "self_moe")
    before = mixed.state_dict()
    if recipe == "btx":  # attention is the average of the two fine-tunes' before post-training
        name = "model.layers.0.self_attn.q_proj.weight"
        ws = [load_file(resolve_path(d["expert"], out / "branch") / "model.safetensors")[name] for d in branch["domains"]]
        assert torch.allclose(before[name], (ws[0] + ws[1]) / 2, atol=1e-6)
    from upcycle.export.model_card import read_front_matter
    tags = read_front_matter(out / "post_train" / "model" / "README.md")["tags"]
    assert {"btx": "branch-train-mix", "self_moe": "self-moe"}[recipe] in tags and "moe" in tags


def test_a_domain_with_no_rows_is_refused(llama_dir, tiny_data, tmp_path, capsys):
    path = Path(__file__).resolve().parents[1] / "recipes" / "btx.yaml"
    code = main(["run", str(path), "--quiet", f"base={llama_dir}", f"data.train=[{tiny_data}]", f"out={tmp_path / 'r'}",
                 "branch.domains=[math, poetry]", *TINY])
    assert code == 2 and "branch.domains: 'poetry' has no rows" in capsys.readouterr().err
    assert not (tmp_path / "r" / "branch" / "experts").exists()


@pytest.mark.parametrize("content", ['{"recipe": "upit_lora", ', '["prepare"]', '{"recipe": "upit_lora"}'])
def test_a_broken_run_record_is_refused_naming_it(content, llama_dir, tiny_data, tmp_path, capsys):
    out = tmp_path / "r"
    out.mkdir()
    (out / "run.json").write_text(content)
    path = Path(__file__).resolve().parents[1] / "recipes" / "upit_lora.yaml"
    code = main(["run", str(path), "--quiet", f"base={llama_dir}", f"data.train=[{tiny_data}]", f"out={out}", *TINY])
    assert code == 2 and f"{out / 'run.json'}: not a run record" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["run.json"] and (out / "run.json").read_text() == content
