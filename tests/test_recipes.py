"""Every recipe validates, and a tiny version of each runs end to end (tiny model, tiny data)."""

import json
from pathlib import Path

import pytest

from upcycle.cli import main
from upcycle.config import load_config
from upcycle.pipeline import RunConfig, stage_configs

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
TINY = ["data.max_length=64", "data.eval_fraction=0.1", "evaluate=false",
        "prepare.train.epochs=2", "prepare.train.batch_size=8", "prepare.save_every=0.25", "route.seed_count=8", "route.train.epochs=1",
        "route.train.batch_size=4", "post_train.train.batch_size=4", "post_train.train.epochs=0.5", "post_train.save_every=0.5"]


def test_there_are_recipes_for_every_method():
    names = {p.stem for p in RECIPES}
    assert {"upit_lora", "upit_ffn", "dense_sft", "dense_lora", "upcycle_sft", "upcycle_pt", "loramoe_sft",
            "ablation_no_router_init", "ablation_random_buckets", "ablation_random_parents", "ablation_no_expansion",
            "ablation_first_half", "nvidia_granular", "drop_upcycling"} <= names


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
