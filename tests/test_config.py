"""Configuration: one schema for YAML, CLI flags and key=value overrides; every error at once."""

import pytest
import yaml

from upcycle.cli import main
from upcycle.config import BuildConfig, parse_size
from upcycle.config_io import load_config, parse_overrides
from upcycle.errors import UpcycleError


def write_yaml(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_yaml_flags_and_overrides_merge_in_order(tmp_path):
    cfg_file = write_yaml(tmp_path / "c.yaml", {"base": "/a", "out": "/b", "moe": {"num_experts": 4, "top_k": 1}})
    cfg = load_config(BuildConfig, cfg_file, ["moe.top_k=2", "init.method=drop", "init.drop_ratio=0.25"],
                      values={"moe": {"num_experts": 8}})
    assert cfg.moe.num_experts == 8 and cfg.moe.top_k == 2
    assert cfg.init.method == "drop" and cfg.init.drop_ratio == 0.25
    assert str(cfg.base) == "/a"


def test_every_problem_is_reported_at_once_with_its_key(tmp_path):
    cfg_file = write_yaml(tmp_path / "c.yaml", {
        "base": "/a", "out": "/b", "moe": {"num_expert": 4, "top_k": 0, "routing": "sigmoid"}, "bogus": 1})
    with pytest.raises(UpcycleError) as e:
        load_config(BuildConfig, cfg_file)
    text = "\n".join(e.value.problems)
    assert len(e.value.problems) == 4
    assert "moe.num_expert: unknown key" in text
    assert "bogus: unknown key" in text
    assert "moe.top_k:" in text and "greater than 0" in text
    assert "moe.routing:" in text and "'sigmoid'" in text


def test_cross_field_problems_are_reported_together():
    with pytest.raises(UpcycleError) as e:
        load_config(BuildConfig, None, ["base=/a", "out=/b", "moe.num_experts=6", "moe.top_k=8", "moe.granularity=4"])
    text = "\n".join(e.value.problems)
    assert "moe.top_k: 8 is larger than moe.num_experts=6" in text
    assert "moe.num_experts: 6 is not a multiple of moe.granularity=4" in text
    assert "init.method: copy makes full-width experts" in text


def test_override_values_are_typed():
    assert parse_overrides(["a.b=3", "c=true", "d=[1, 2]", "e=x"]) == {"a": {"b": 3}, "c": True, "d": [1, 2], "e": "x"}
    with pytest.raises(UpcycleError, match="expected key=value"):
        parse_overrides(["moe.top_k"])


def test_sizes():
    assert parse_size("2GB") == 2_000_000_000
    assert parse_size("500 MiB") == 500 * 2**20
    with pytest.raises(ValueError):
        parse_size("big")


def test_validate_command(capsys, tmp_path, llama_dir):
    good = write_yaml(tmp_path / "good.yaml", {"base": str(llama_dir), "out": str(tmp_path / "o"),
                                               "moe": {"num_experts": 4, "routing": "softmax_topk"}})
    assert main(["validate", str(good)]) == 0
    printed = capsys.readouterr().out
    assert ": ok" in printed and "format qwen2_moe" in printed  # softmax_topk on a llama base -> qwen2_moe
    bad = write_yaml(tmp_path / "bad.yaml", {"base": str(llama_dir), "out": str(tmp_path / "o"), "moe": {"topk": 2}})
    assert main(["validate", str(bad)]) == 2
    assert "moe.topk: unknown key" in capsys.readouterr().err


def test_resolved_config_is_written_next_to_the_output(llama_dir, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["build", "--quiet", "--base", str(llama_dir), "--out", str(out), "--num-experts", "2", "--top-k", "1",
                 "moe.router_init_std=0.05"]) == 0
    resolved = yaml.safe_load((out / "upcycle_config.yaml").read_text())
    assert resolved["moe"]["num_experts"] == 2 and resolved["moe"]["router_init_std"] == 0.05
    assert resolved["init"]["drop_index_sets"] == "shared"  # defaults are recorded too
    assert BuildConfig.model_validate(resolved).moe.top_k == 1  # and re-load as a config
