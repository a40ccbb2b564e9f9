"""Every exported folder carries a model card: hub front matter, what the model is, how to load it."""

import json
import math
import re
import shutil

import pytest
import torch
import yaml
from safetensors import safe_open

from upcycle.config import BuildConfig, InitSpec, MoESpec
from upcycle.errors import UpcycleError
from upcycle.export import model_card as card_module
from upcycle.export.model_card import base_identity
from upcycle.stages import build


def front_matter(text: str) -> dict:
    """Parsed the way the hub does: a YAML block between the first two '---' lines."""
    assert text.startswith("---\n")
    head, _, _ = text[4:].partition("\n---\n")
    return yaml.safe_load(head)


def table(text: str) -> dict[str, str]:
    """The card's two-column markdown rows as {key: value}."""
    return {m[1]: m[2] for m in re.finditer(r"^\| ([^|]+?) \| (.+?) \|$", text, re.M)}


def python_block(text: str) -> str:
    return text.split("```python\n", 1)[1].split("```", 1)[0]


def stored_parameters(folder) -> int:
    total = 0
    for f in folder.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            total += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    return total


@pytest.fixture
def hub_like_base(llama_dir, tmp_path):
    """The tiny Llama as a hub checkpoint ships: a README with front matter and `_name_or_path`."""
    base = tmp_path / "Llama-2-7b-hf"
    shutil.copytree(llama_dir, base)
    cfg = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({"_name_or_path": "meta-llama/Llama-2-7b-hf", **cfg}, indent=2))
    (base / "README.md").write_text(
        "---\nlanguage:\n- en\nlicense: llama2\npipeline_tag: text-generation\ntags:\n- facebook\n- llama-2\n"
        "base_model: meta-llama/Llama-2-7b\nextra_gated_prompt: accept the license\n---\n# Llama 2\n\nText.\n")
    return base


def test_build_card_front_matter_and_facts(hub_like_base, tmp_path, monkeypatch):
    out = tmp_path / "llama-moe"
    build.run(BuildConfig(base=hub_like_base, out=out, moe=MoESpec(num_experts=4, top_k=3, routing="softmax_topk_renorm")),
              progress=False)
    text = (out / "README.md").read_text()
    meta = front_matter(text)
    assert meta["base_model"] == "meta-llama/Llama-2-7b-hf"  # the base itself, not the base's own base_model
    assert meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-generation"
    assert meta["license"] == "llama2"
    assert meta["language"] == ["en"]
    assert {"moe", "upcycle", "mixtral"} <= set(meta["tags"])
    assert not {"facebook", "llama-2"} & set(meta["tags"])  # the base's tags describe the base
    assert "extra_gated_prompt" not in meta
    rows = table(text)
    assert rows["experts"] == "4 routed per MoE layer"
    assert rows["top-k"] == "3 experts per token"
    assert rows["routing"].startswith("softmax_topk_renorm: ")
    assert rows["MoE layers"] == "2 of 2"
    n = stored_parameters(out)
    assert rows["parameters"].startswith(f"{n / 1e3:.2f}K total")
    # The card's own loading snippet works, from the folder's parent, with stock transformers.
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(python_block(text), scope)
    assert type(scope["model"]).__name__ == "MixtralForCausalLM" and rows["format"].startswith("`MixtralForCausalLM`")


def test_no_base_card_and_a_local_name_or_path(llama_dir, tmp_path):
    out = tmp_path / "moe"
    build.run(BuildConfig(base=llama_dir, out=out, moe=MoESpec(num_experts=2, top_k=1)), progress=False)
    meta = front_matter((out / "README.md").read_text())
    assert meta["base_model"] == llama_dir.name and "license" not in meta


def test_card_written_before_the_folder_appears(llama_dir, tmp_path, monkeypatch):
    """The card is part of the atomic write: if it fails, no output folder exists at all."""
    def broken(facts):
        raise UpcycleError("card failed")

    monkeypatch.setattr("upcycle.export.save.model_card", broken)
    with pytest.raises(UpcycleError, match="card failed"):
        build.run(BuildConfig(base=llama_dir, out=tmp_path / "moe", moe=MoESpec(num_experts=2, top_k=1)), progress=False)
    assert [p for p in tmp_path.iterdir() if p.is_dir()] == []  # no output, no temporary left behind


def test_save_moe_card_names_the_init_and_method(llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from upcycle import save_moe, upcycle_model

    dense = AutoModelForCausalLM.from_pretrained(llama_dir)
    init = InitSpec(method="drop", drop_ratio=0.25)
    moe = upcycle_model(dense, MoESpec(num_experts=4, top_k=2, routing="softmax_topk"), init, seed=0)
    save_moe(moe, tmp_path / "m", format="qwen2_moe", progress=False,
             card={"init": init.model_dump(mode="json"), "stages": ["upcycle: drop"]})
    text = (tmp_path / "m" / "README.md").read_text()
    meta, rows = front_matter(text), table(text)
    assert meta["base_model"] == llama_dir.name
    assert {"drop-upcycling", "qwen2_moe"} <= set(meta["tags"])
    assert rows["method"] == "Drop-Upcycling"
    assert rows["init"] == "drop, drop ratio 0.25 (shared index sets)"
    assert rows["routing"].startswith("softmax_topk: ") and "without renormalization" in rows["routing"]
    assert rows["format"].startswith("`Qwen2MoeForCausalLM`")
    assert "1. upcycle: drop" in text


def test_own_format_card_says_load_moe(llama_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from upcycle import save_moe, upcycle_model

    dense = AutoModelForCausalLM.from_pretrained(llama_dir)
    spec = MoESpec(num_experts=3, top_k=2, expert_type="lora")
    moe = upcycle_model(dense, spec, InitSpec(), seed=0)
    save_moe(moe, tmp_path / "own", format="upcycle", lora_storage="compact", base_path=llama_dir, progress=False)
    text = (tmp_path / "own" / "README.md").read_text()
    assert set(front_matter(text)["tags"]) >= {"moe", "upcycle", "lora-experts"}
    assert table(text)["format"].startswith("upcycle's own format")
    # the compact folder names the base it loads onto, by name and fingerprint, never by its local path
    assert "`llama, fingerprint " in text and str(llama_dir) not in text
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(python_block(text), scope)
    ids = torch.randint(6, 128, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(scope["model"](ids).logits, moe(ids).logits, atol=1e-5)


def test_update_card_adds_scores_and_keeps_the_rest(llama_dir, tmp_path):
    from upcycle.export.save import update_card

    out = tmp_path / "moe"
    build.run(BuildConfig(base=llama_dir, out=out, moe=MoESpec(num_experts=2, top_k=1)), progress=False)
    before = (out / "README.md").read_text()
    assert "## Scores" not in before
    update_card(out, scores={"math": 0.125, "average": 0.0625})
    after = (out / "README.md").read_text()
    rows = table(after)
    assert rows["math"] == "0.125" and rows["average"] == "0.0625"
    assert {k: v for k, v in rows.items() if k not in ("math", "average", "task")} == table(before)
    assert front_matter(after) == front_matter(before)
    assert json.loads((out / "upcycle_provenance.json").read_text())["card"]["scores"] == {"math": 0.125, "average": 0.0625}


def test_base_identity():
    assert base_identity(None, {"_name_or_path": "Qwen/Qwen2.5-0.5B"}) == ("Qwen/Qwen2.5-0.5B", {})
    assert base_identity("/models/llama3", {"_name_or_path": "/fsx/ckpts/llama3/step1000"}) == ("llama3", {})
    assert base_identity(None, {}) == (None, {})


def test_quantized_copy_names_its_upstream(llama_dir, tmp_path):
    """The bundled SmolLM2 folder is a dequantized GGUF; its card says so, and the MoE's card names the original."""
    from upcycle.bundled import SMOLLM2_CARD

    base = tmp_path / "SmolLM2-135M-Instruct"
    shutil.copytree(llama_dir, base)
    (base / "README.md").write_text(SMOLLM2_CARD)
    assert base_identity(base, {}) == ("HuggingFaceTB/SmolLM2-135M-Instruct", {"license": "apache-2.0"})
    (base / "README.md").write_text("---\nbase_model: HuggingFaceTB/SmolLM2-135M\nlicense: apache-2.0\n---\n")
    assert base_identity(base, {}) == ("SmolLM2-135M-Instruct", {"license": "apache-2.0"})  # a fine-tune: itself


def test_unparsable_base_card_is_ignored(llama_dir, tmp_path):
    base = tmp_path / "b"
    shutil.copytree(llama_dir, base)
    (base / "README.md").write_text("---\nlicense: [unclosed\n---\n")
    assert base_identity(base, {}) == ("b", {})


def test_post_train_card_names_method_stages_data_and_scores(llama_dir, tmp_path):
    from tests.test_post_train import pt_cfg
    from upcycle.stages import post_train

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"q {i}", "output": "a" * 4}) + "\n" for i in range(16)))
    cfg = pt_cfg(llama_dir, tmp_path / "p", data, "train.epochs=1", "save_every=1", "init.method=virtual_group",
                 "moe.num_experts=4", "moe.granularity=2", "moe.top_k=2", "evaluate=true", "eval_max_items=1")
    summary = post_train.run(cfg, progress=False)
    text = (tmp_path / "p" / "model" / "README.md").read_text()
    meta, rows = front_matter(text), table(text)
    assert "virtual-group-upcycling" in meta["tags"] and meta["base_model"] == llama_dir.name
    assert rows["granularity"].startswith("2 ")
    assert rows["init"] == "virtual_group"
    assert "1. upcycle: 4 experts from the dense MLP, init virtual_group" in text
    assert "2. post-train: 1 epoch, LM + load-balancing loss (coefficient 0.01), trainable: all" in text
    assert "`train.jsonl (sha256 " in text and str(tmp_path) not in text  # data by name and hash, no local path
    assert summary["scores"], "the suite was scored"
    for task, score in {**summary["scores"], "average": summary["average"]}.items():
        assert rows[task] == f"{score:.4g}"


def test_upit_card_info_from_the_expand_manifest(tmp_path):
    from upcycle.config import PostTrainConfig
    from upcycle.stages.post_train import card_info

    expand = tmp_path / "expand"
    expand.mkdir()
    experts = [{"index": i, "origin": "checkpoint" if i < 3 else "child", "path": f"experts/e{i}", "sha256": "-"}
               for i in range(4)]
    (expand / "manifest.json").write_text(json.dumps({"stage": "expand", "config_hash": "-", "complete": True,
                                                      "base": "/m/SmolLM2", "kind": "lora", "num_experts": 4,
                                                      "experts": experts}))
    info = card_info(PostTrainConfig(source="upit", expand=expand, route=None), "experts_and_routers")
    assert info["method"] == "upit" and info["base"] == "/m/SmolLM2"
    assert info["stages"][1] == "expand: 4 experts: 3 checkpoints + 1 DARE-merged children"
    assert info["stages"][2] == "route: skipped (random routers)"
    facts = card_module.CardFacts(name="x", spec=MoESpec().model_dump(mode="json"), format="mixtral",
                                  model_class="MixtralForCausalLM", moe_layers=2, num_layers=2,
                                  parameters={"total": 10, "active": 5}, dtype="float32", base_model="SmolLM2",
                                  **{k: info[k] for k in ("method", "stages", "data", "tool")})
    text = card_module.model_card(facts)
    assert "upit" in front_matter(text)["tags"]
    assert table(text)["method"] == "UpIT (Upcycling Instruction Tuning)"


def test_merge_card(hub_like_base, llama_dir, tmp_path, monkeypatch):
    """stages/merge.py writes `merge_card(cfg, folders, base_folder)` into its temporary folder."""
    from upcycle.config import MergeConfig
    from upcycle.export.model_card import merge_card
    from upcycle.io.model_folder import ModelFolder

    a = tmp_path / "ft-a"
    shutil.copytree(llama_dir, a)
    cfg = MergeConfig(method="ties", base=str(hub_like_base), out=tmp_path / "merged", density=0.5,
                      models=[{"path": str(a), "weight": 1.0}, {"path": str(llama_dir), "weight": 0.5}])
    text = merge_card(cfg, [ModelFolder(a, what="model"), ModelFolder(llama_dir, what="model")],
                      ModelFolder(hub_like_base))
    meta = front_matter(text)
    assert meta["base_model"] == ["meta-llama/Llama-2-7b-hf", "ft-a", llama_dir.name]
    assert meta["license"] == "llama2" and {"merge", "ties"} <= set(meta["tags"])
    assert "- `ft-a` (weight 1)" in text and f"- `{llama_dir.name}` (weight 0.5)" in text
    config = yaml.safe_load(text.split("```yaml\n", 1)[1].split("```", 1)[0])
    assert config["method"] == "ties" and config["density"] == 0.5 and "out" not in config
