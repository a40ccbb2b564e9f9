"""`upcycle validate` refuses everything a run would fail on, naming the full dotted key.

Every constraint a stage enforces is a validator on its section (or on the recipe, across
stages), so the same refusal comes from `upcycle validate`, from `upcycle run` before any stage
starts, and from Python when the config is built. Each case below is one such constraint.
"""

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from upcycle.cli import main
from upcycle.config import (BuildConfig, ExpandConfig, InitSpec, MergeConfig, MoESpec, PostTrainConfig, PrepareConfig, RouteConfig)
from upcycle.config_io import config_hash, deep_merge, load_config, parse_overrides, read_yaml
from upcycle.errors import UpcycleError
from upcycle.pipeline import RunConfig, stage_configs

RECIPES = Path(__file__).resolve().parents[1] / "recipes"

# (recipe, overrides, what the error must say: it starts with the full dotted key)
CASES = [
    # top_k <= num_experts, for every MoE a recipe builds
    ("upit_lora", ["post_train.moe.top_k=16"], "post_train.moe.top_k: 16 is larger than post_train.moe.num_experts=8"),
    ("upcycle_sft", ["post_train.moe.top_k=5"], "post_train.moe.top_k: 5 is larger than post_train.moe.num_experts=4"),
    ("upit_lora", ["route.moe.top_k=9"], "route.moe.top_k: 9 is larger than expand.num_experts=8"),
    # the expert pool: route and post_train route over expand's N experts of prepare's kind
    ("upit_lora", ["expand.num_experts=16"], "post_train.moe.num_experts: 8 contradicts expand.num_experts=16"),
    ("upit_lora", ["route.moe.num_experts=4"], "route.moe.num_experts: 4 contradicts expand.num_experts=8"),
    ("upit_ffn", ["post_train.moe.expert_type=lora"], "post_train.moe.expert_type: lora contradicts prepare.mode=full"),
    ("upit_lora", ["post_train.moe.granularity=2"], "post_train.moe.granularity: UpIT experts are whole"),
    ("upit_lora", ["route.moe.granularity=2"], "route.moe.granularity: UpIT experts are whole"),
    ("upit_lora", ["post_train.moe.num_shared_experts=1"], "post_train.moe.num_shared_experts: UpIT's pool has no shared"),
    ("upit_lora", ["post_train.moe.layers=[0]"], "post_train.moe.layers: UpIT's MoE layers are the ones"),
    ("upit_lora", ["post_train.init.method=drop"], "post_train.init: only used with post_train.source=upcycle"),
    # granularity and virtual groups
    ("nvidia_granular", ["post_train.moe.num_experts=60"],
     "post_train.moe.num_experts: 60 is not a multiple of post_train.moe.granularity=8"),
    ("nvidia_granular", ["post_train.moe.top_k=12"],
     "post_train.moe.top_k: virtual groups need top_k to be a multiple of granularity"),
    ("nvidia_granular", ["post_train.init.method=copy"], "post_train.init.method: copy makes full-width experts"),
    # formats vs routing, shared experts and LoRA storage
    ("upcycle_sft", ["post_train.export.format=mixtral", "post_train.moe.routing=softmax_topk"],
     "post_train.export.format: mixtral cannot express routing softmax_topk"),
    ("upcycle_sft", ["post_train.export.format=qwen3_moe", "post_train.moe.num_shared_experts=1",
                     "post_train.moe.shared_expert_gate=true"], "post_train.export.format: qwen3_moe has no shared experts"),
    ("upcycle_sft", ["post_train.export.format=qwen2_moe", "post_train.moe.num_shared_experts=1"],
     "post_train.export.format: qwen2_moe gates its shared expert by sigmoid"),
    ("loramoe_sft", ["post_train.export.format=mixtral", "post_train.export.lora_storage=compact"],
     "post_train.export.format: mixtral cannot store LoRA experts compactly"),
    # LoRA experts vs MLP MoE settings
    ("loramoe_sft", ["post_train.moe.granularity=2"], "post_train.moe.granularity: LoRA experts share the full dense MLP"),
    ("loramoe_sft", ["post_train.init.method=drop"], "post_train.init.method: LoRA experts start as the dense MLP"),
    ("loramoe_sft", ["post_train.init.weight_scaling=output"], "post_train.init.weight_scaling: not defined for LoRA"),
    ("upcycle_sft", ["post_train.moe.layers=[1, 1]"], "post_train.moe.layers: [1, 1] lists a layer twice"),
    ("upcycle_sft", ["post_train.moe.layers=[-1]"], "post_train.moe.layers: [-1] are negative"),
    # save_every vs epochs
    ("upit_lora", ["prepare.save_every=0.3"], "prepare.save_every: 0.3 does not divide prepare.train.epochs=2.0"),
    ("upit_lora", ["post_train.save_every=3"], "post_train.save_every: 3.0 is more than post_train.train.epochs=2.0"),
    ("dense_lora", ["prepare.save_every=8"], "prepare.save_every: 8.0 is more than prepare.train.epochs=4.0"),
    # checkpoint selection vs the count prepare saves (epochs / save_every = 8 here)
    ("upit_lora", ["expand.checkpoints=[0, 9]"], "expand.checkpoints: indices [9] out of range; prepare saves checkpoints 0..7"),
    ("upit_lora", ["expand.checkpoints=[1, 1]"], "expand.checkpoints: [1, 1] lists a checkpoint twice"),
    ("upit_lora", ["expand.checkpoints=[]"], "expand.checkpoints: the list is empty"),
    ("upit_lora", ["expand.num_experts=3", "post_train.moe.num_experts=3"],
     "expand.num_experts: 3 is below the pool size 4 (expand.checkpoints='second_half' selects 4)"),
    ("ablation_no_expansion", ["expand.num_experts=10", "post_train.moe.num_experts=10"],
     "expand.expansion is off but expand.checkpoints='all' selects only 8 of the expand.num_experts=10 experts"),
    ("upit_lora", ["prepare.save_every=1.0", "expand.checkpoints=first_half"],
     "expand.checkpoints: expansion merges two experts into a child, but expand.checkpoints='first_half' selects 1"),
    # a stage's own seed / data / evaluate / paths that contradict the recipe's
    ("upit_lora", ["prepare.seed=3"], "prepare.seed: 3 contradicts the recipe's seed=0"),
    ("upit_lora", ["seed=2", "expand.seed=0"], "expand.seed: 0 contradicts the recipe's seed=2"),
    ("upit_lora", ["route.data.max_length=128"], "route.data.max_length: 128 contradicts the recipe's data.max_length=256"),
    ("upit_lora", ["post_train.data.train=[mine.jsonl]"], "post_train.data.train: ['mine.jsonl'] contradicts the recipe's"),
    ("upit_lora", ["prepare.evaluate=false"], "prepare.evaluate: False contradicts the recipe's evaluate='auto'"),
    ("upit_lora", ["prepare.out=/elsewhere"], "prepare.out: /elsewhere, but a recipe connects its stages itself"),
    ("upit_lora", ["route.expand=/elsewhere"], "route.expand: /elsewhere, but a recipe connects its stages itself"),
    # stages and sources
    ("upit_lora", ["stages=[expand, post_train]"], "stages: expand needs prepare before it"),
    ("upit_lora", ["stages=[post_train, prepare]"], "stages: ['post_train', 'prepare'] must be in the order"),
    ("upit_lora", ["stages=[post_train]"], "post_train.source: upit needs the expand stage"),
    ("upcycle_sft", ["post_train.dense=@prepare"], "post_train.dense: @prepare needs the prepare stage"),
    ("upcycle_sft", ["post_train.route=/r"], "post_train.route: only used with post_train.source=upit"),
    ("upit_lora", ["post_train.dense=/d"], "post_train.dense: only used with post_train.source=upcycle"),
]


def ids(case):
    return f"{case[0]}:{' '.join(case[1])}"


def recipe_data(recipe: str, overrides: list[str]) -> dict:
    """The recipe as one nested dict, the way a Python user would build it (no upcycle loader involved)."""
    return deep_merge(read_yaml(RECIPES / f"{recipe}.yaml"), parse_overrides(overrides))


@pytest.mark.parametrize("recipe, overrides, message", CASES, ids=[ids(c) for c in CASES])
def test_validate_refuses_with_the_full_key(recipe, overrides, message, capsys):
    code = main(["validate", str(RECIPES / f"{recipe}.yaml"), *overrides])
    captured = capsys.readouterr()
    assert code == 2 and "ok" not in captured.out
    lines = captured.err.strip().splitlines()
    assert all(line.startswith("upcycle: error: ") for line in lines)
    assert any(message in line for line in lines), captured.err
    # the recipe without the override is fine: the refusal is this constraint's alone
    assert main(["validate", str(RECIPES / f"{recipe}.yaml")]) == 0


@pytest.mark.parametrize("recipe, overrides, message", CASES, ids=[ids(c) for c in CASES])
def test_python_refuses_the_same(recipe, overrides, message):
    with pytest.raises(UpcycleError) as loaded:
        load_config(RunConfig, RECIPES / f"{recipe}.yaml", overrides)
    assert any(message in p for p in loaded.value.problems)
    # constructing the config directly: pydantic's error, at the section's location, with keys relative to it
    with pytest.raises(ValidationError) as built:
        RunConfig.model_validate(recipe_data(recipe, overrides))
    text = str(built.value)
    section = message.split(".")[0]
    assert message in text or (f"\n{section}\n" in text and message.replace(f"{section}.", "") in text), text


def test_every_problem_of_every_section_at_once(capsys):
    code = main(["validate", str(RECIPES / "upit_lora.yaml"), "post_train.moe.top_k=16", "prepare.save_every=0.3",
                 "route.moe.granularity=2", "expand.checkpoints=[1, 1]"])
    err = capsys.readouterr().err
    assert code == 2
    for key in ("post_train.moe.top_k:", "prepare.save_every:", "route.moe.granularity:", "expand.checkpoints:"):
        assert f"upcycle: error: {RECIPES / 'upit_lora.yaml'}: {key}" in err, err


@pytest.fixture
def no_stage_may_start(monkeypatch):
    """A stage that starts fails the test at once (instead of training for minutes)."""
    import upcycle.pipeline

    monkeypatch.setattr(upcycle.pipeline, "_module", lambda stage: pytest.fail(f"stage {stage} was started"))


def test_the_issue_example_is_refused_before_any_stage_runs(tmp_path, capsys, no_stage_may_start):
    out = tmp_path / "run"
    code = main(["run", str(RECIPES / "upit_lora.yaml"), "--quiet", f"out={out}", "post_train.moe.top_k=16"])
    assert code == 2 and "post_train.moe.top_k: 16" in capsys.readouterr().err
    assert not out.exists()


# ------------------------------------------------------------------ checks that need the base's config.json

BASE_CASES = [  # the tiny llama: intermediate_size 64, 2 layers
    ("nvidia_granular", ["post_train.moe.granularity=3", "post_train.moe.num_experts=6", "post_train.moe.top_k=3"],
     "post_train.moe.granularity: 3 does not divide the base's intermediate_size=64"),
    ("upcycle_sft", ["post_train.moe.layers=[0, 5]"], "post_train.moe.layers: [5] out of range; the base has layers 0..1"),
    ("upcycle_sft", ["post_train.export.format=qwen3_moe"],
     "post_train.export.format: format qwen3_moe takes dense models of type qwen3, not llama"),
    ("upit_lora", ["post_train.export.format=qwen3_moe"],
     "post_train.export.format: format qwen3_moe takes dense models of type qwen3, not llama"),
]


@pytest.mark.parametrize("recipe, overrides, message", BASE_CASES, ids=[ids(c) for c in BASE_CASES])
def test_base_config_checks_in_validate_and_before_run(recipe, overrides, message, llama_dir, tmp_path, capsys,
                                                      no_stage_may_start):
    args = [str(RECIPES / f"{recipe}.yaml"), f"base={llama_dir}", *overrides]
    assert load_config(RunConfig, args[0], args[1:])  # the recipe alone is consistent; only the base refutes it
    assert main(["validate", *args]) == 2
    assert message in capsys.readouterr().err
    out = tmp_path / "run"
    assert main(["run", *args, "--quiet", f"out={out}"]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()  # no stage folder, no run.json: nothing was started
    assert main(["validate", str(RECIPES / f"{recipe}.yaml"), f"base={llama_dir}"]) == 0


def test_a_missing_or_unsupported_base_is_named(tmp_path, capsys):
    assert main(["validate", str(RECIPES / "upit_lora.yaml"), f"base={tmp_path / 'nope'}"]) == 2
    assert "nope: folder not found" in capsys.readouterr().err
    odd = tmp_path / "gpt2"
    odd.mkdir()
    (odd / "config.json").write_text('{"model_type": "gpt2"}')
    (odd / "model.safetensors").write_bytes(b"")
    assert main(["validate", str(RECIPES / "upit_lora.yaml"), f"base={odd}"]) == 2
    assert "model_type 'gpt2' is not supported" in capsys.readouterr().err


# ------------------------------------------------------------------ sections on their own, from Python


def test_each_section_refuses_in_python():
    def refused(build, text):
        with pytest.raises(ValidationError) as e:
            build()
        assert text in str(e.value), str(e.value)

    refused(lambda: BuildConfig(base="/a", out="/b", moe=MoESpec(num_experts=4, top_k=6)), "moe.top_k: 6 is larger")
    refused(lambda: BuildConfig(base="/a", out="/b", moe=MoESpec(num_experts=8, granularity=2, top_k=3),
                                init=InitSpec(method="virtual_group")), "moe.top_k: virtual groups need")
    refused(lambda: PrepareConfig(save_every=0.75), "save_every: 0.75 does not divide train.epochs=2.0")
    refused(lambda: ExpandConfig(num_experts=2, checkpoints=[0, 1, 2]), "num_experts: 2 is below the pool size 3")
    refused(lambda: RouteConfig(moe=MoESpec(num_experts=2, top_k=3)), "moe.top_k: 3 is larger than moe.num_experts=2")
    refused(lambda: PostTrainConfig(source="upcycle", moe=MoESpec(num_experts=8, top_k=16)), "moe.top_k: 16 is larger")
    refused(lambda: PostTrainConfig(source="upcycle", save_every=3), "save_every: 3.0 is more than train.epochs=2.0")
    assert PostTrainConfig(source="upcycle", save_every=0.3).save_every == 0.3  # resume points need not divide epochs
    refused(lambda: MergeConfig(method="ties", models=[{"path": "/m"}], out="/o"), "base: merge method ties")
    refused(lambda: RunConfig(out="/o", seed=1, prepare=PrepareConfig(seed=2)), "prepare.seed: 2 contradicts the recipe's seed=1")
    # a pool MoE whose num_experts is not given takes the pool's: no false refusal from the default 8
    assert RouteConfig(moe=MoESpec(top_k=12)).moe.top_k == 12


def test_upcycle_model_checks_a_spec_built_in_python(llama_dir):
    from transformers import AutoModelForCausalLM

    from upcycle.moe.model import upcycle_model

    with pytest.raises(UpcycleError, match="moe.top_k: 3 is larger than moe.num_experts=2"):
        upcycle_model(AutoModelForCausalLM.from_pretrained(llama_dir), MoESpec(num_experts=2, top_k=3), InitSpec())


# ------------------------------------------------------------------ what the recipe fills in


def test_stages_get_the_recipe_values_and_the_pool_size():
    cfg = load_config(RunConfig, RECIPES / "upit_ffn.yaml", ["seed=7", "data.max_length=99"])
    cfgs = stage_configs(cfg)
    assert [c.seed for c in cfgs.values()] == [7, 7, 7, 7]
    assert {cfgs[s].data.max_length for s in ("prepare", "route", "post_train")} == {99}
    # route's MoE routes over expand's 4 FFN experts (not the MoESpec default of 8 MLP experts)
    assert (cfgs["route"].moe.num_experts, cfgs["route"].moe.expert_type) == (4, "mlp")
    lora = stage_configs(load_config(RunConfig, RECIPES / "upit_lora.yaml"))
    assert (lora["route"].moe.num_experts, lora["route"].moe.expert_type) == (8, "lora")
    # a change after construction re-fills what the recipe filled in (it was not given by the user)
    cfg.seed = 11
    assert stage_configs(cfg)["prepare"].seed == 11 and cfg.route.seed == 11


@pytest.mark.parametrize("recipe", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.stem)
def test_the_resolved_recipe_loads_again_to_the_same_stages(recipe, tmp_path):
    cfg = load_config(RunConfig, recipe, ["seed=3", "data.max_length=100"])
    path = tmp_path / "resolved.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True), sort_keys=False))
    again = load_config(RunConfig, path)
    assert {s: config_hash(c) for s, c in stage_configs(again).items()} == \
        {s: config_hash(c) for s, c in stage_configs(cfg).items()}
