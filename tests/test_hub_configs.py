"""Real checkpoints' config.json as the hub ships them (transformers-4 layout), through every path.

tests/fixtures/hub_configs/*.json reproduce the published config.json files key for key. Each is
shrunk in its sizes only (`shrink`), a dense model with seeded random weights is written with the
config.json exactly as shipped (not re-saved by transformers 5), and the dense model as transformers
itself reads that folder is the reference: every format that can express the MoE must reproduce its
logits (<= 1e-4) on a sequence longer than the sliding window and than the RoPE scaling's original
length, and greedy generation must give the same tokens.
"""

import json
from pathlib import Path

import pytest
import torch
from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM

from upcycle import load_moe, save_moe, upcycle_model
from upcycle.architectures import FORMAT_PREFERENCE, MOE_FORMATS, OWN_FORMAT
from upcycle.cli import main
from upcycle.config import InitSpec, MoESpec
from upcycle.dense_config import FACT_FIELDS, NOT_FORWARD_FIELDS, format_problem
from upcycle.errors import UpcycleError
from upcycle.io.model_folder import ModelFolder
from upcycle.tiny import char_tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "hub_configs"
HUB = {p.stem: json.loads(p.read_text()) for p in sorted(FIXTURES.glob("*.json"))}
WINDOW = 16      # shrunk sliding_window
ORIGINAL = 16    # shrunk original_max_position_embeddings of a RoPE scaling
SEQ = 48         # > WINDOW and > ORIGINAL
PROMPT, NEW = 40, 8
VOCAB = 128
STOCK_CLASS = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
# Which formats express each family exactly (the MoE spec here: copy init, top-2 of 4, topk_softmax).
EXPECTED_FORMATS = {"llama": {"mixtral", "qwen2_moe", OWN_FORMAT}, "mistral": {"mixtral", "qwen2_moe", OWN_FORMAT},
                    "qwen2": {"qwen2_moe", OWN_FORMAT}, "qwen3": {"qwen3_moe", OWN_FORMAT}}
SPEC = MoESpec(num_experts=4, top_k=2, routing="topk_softmax")
TOKENIZER = char_tokenizer()  # 104 tokens, within VOCAB; `upcycle run` needs one


def shrink(cfg: dict) -> dict:
    """The shipped config with only its sizes made tiny; every other key stays as published.

    Heads: the group size (query heads per key/value head) is kept with one key/value head (4 and 4
    without grouping, as Llama-2-7B); head size 16. An explicit head_dim (Qwen3) stays explicit and
    differs from hidden/heads, as it does in the real models. Windows and the RoPE scaling's original
    length become 16 so that a 48-token sequence exceeds them.
    """
    out = dict(cfg)
    group = cfg["num_attention_heads"] // cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    kv = 4 if group == 1 else 1
    out.update(num_attention_heads=group * kv, num_key_value_heads=kv, num_hidden_layers=2, intermediate_size=64,
               vocab_size=VOCAB)
    if "head_dim" in cfg:
        out.update(head_dim=16, hidden_size=48)
    else:
        out["hidden_size"] = group * kv * 16
    if cfg.get("sliding_window") is not None:
        out["sliding_window"] = WINDOW
    if cfg.get("rope_scaling") and "original_max_position_embeddings" in cfg["rope_scaling"]:
        out["rope_scaling"] = dict(cfg["rope_scaling"], original_max_position_embeddings=ORIGINAL)
    return out


def write_dense(cfg: dict, path: Path, seed: int = 0) -> Path:
    """A dense model of the stock class with seeded weights, saved with `cfg` as its config.json verbatim."""
    config = CONFIG_MAPPING[cfg["model_type"]].from_dict(dict(cfg))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.15 * noise)
    model.to(getattr(torch, cfg.get("torch_dtype", "float32"))).save_pretrained(path)
    TOKENIZER.save_pretrained(path)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))  # as shipped: transformers-4 layout
    return path


class Reference:
    """The dense model as transformers reads the folder: its logits and greedy continuation."""

    def __init__(self, path: Path):
        self.path = path
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.ids = torch.randint(6, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(1))
        self.logits = logits(model, self.ids)
        self.tokens = greedy(model, self.ids)
        self.rope = model.config.rope_parameters
        assert self.logits.abs().mean() > 0.1  # non-trivial logits, so the comparison means something


def logits(model, ids):
    with torch.no_grad():
        return model.eval()(ids).logits.float()


def greedy(model, ids):
    out = model.generate(ids[:, :PROMPT], max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)
    return out[0, PROMPT:].tolist()


def assert_same_model(moe, ref: Reference, what: str):
    diff = (logits(moe, ref.ids) - ref.logits).abs().max().item()
    assert diff <= 1e-4, f"{what}: max |logit - dense| = {diff}"
    assert greedy(moe, ref.ids) == ref.tokens, what


def load_export(out: Path, fmt: str):
    if fmt == OWN_FORMAT:
        return load_moe(out, dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(model).__name__ == STOCK_CLASS[fmt]
    return model


@pytest.fixture(scope="module")
def hub_dense(tmp_path_factory):
    """name -> Reference of the shrunk hub model, written once per module on first use."""
    root = tmp_path_factory.mktemp("hub")
    cache: dict[str, Reference] = {}

    def get(name: str, cfg: dict | None = None) -> Reference:
        if name not in cache:
            cache[name] = Reference(write_dense(cfg or shrink(HUB[name]), root / name))
        return cache[name]

    return get


def build(base: Path, out: Path, fmt: str, capsys) -> None:
    code = main(["build", "--quiet", "--base", str(base), "--out", str(out), "--num-experts", "4", "--top-k", "2",
                 "--init", "copy", "--router", "topk_softmax", "--format", fmt])
    assert code == 0, capsys.readouterr().err


def test_fixtures_cover_the_families_and_the_hub_layout():
    assert {"Llama-2-7b-hf", "Meta-Llama-3-8B", "Llama-3.1-8B", "Mistral-7B-v0.1", "Mistral-7B-v0.3", "Qwen2.5-0.5B",
            "Qwen2.5-7B", "Qwen3-0.6B", "Qwen3-8B", "SmolLM2-135M", "TinyLlama-1.1B-Chat-v1.0"} <= set(HUB)
    for name, cfg in HUB.items():  # written by transformers 4: no rope_parameters, torch_dtype not dtype
        assert "rope_parameters" not in cfg and "torch_dtype" in cfg, name
        assert cfg["transformers_version"].startswith("4."), name


@pytest.mark.parametrize("name", sorted(HUB))
def test_hub_config_builds_into_every_format_that_expresses_it(name, hub_dense, tmp_path, capsys):
    ref = hub_dense(name)
    folder = ModelFolder(ref.path)
    formats = {f for f in FORMAT_PREFERENCE if format_problem(MOE_FORMATS[f], folder.config, SPEC) is None} | {OWN_FORMAT}
    assert formats == EXPECTED_FORMATS[HUB[name]["model_type"]]
    for fmt in sorted(formats):
        out = tmp_path / fmt
        build(ref.path, out, fmt, capsys)
        assert_same_model(load_export(out, fmt), ref, f"{name} -> {fmt}")
        if fmt != OWN_FORMAT:  # what transformers reads from the export is what it read from the dense config
            assert AutoConfig.from_pretrained(out).rope_parameters == ref.rope, fmt


def test_llama3_rope_theta_from_the_transformers4_layout_survives(hub_dense, tmp_path, capsys):
    """Llama 3 ships `"rope_theta": 500000.0` at the top level; Mixtral's default is 1e6."""
    ref = hub_dense("Meta-Llama-3-8B")
    build(ref.path, tmp_path / "moe", "mixtral", capsys)
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 500000.0}
    moe = AutoModelForCausalLM.from_pretrained(tmp_path / "moe", dtype=torch.float32)
    assert_same_model(moe, ref, "llama3 -> mixtral")


@pytest.mark.parametrize("name", sorted(HUB))
def test_python_api_upcycle_model_and_save_moe(name, hub_dense, tmp_path):
    ref = hub_dense(name)
    dense = AutoModelForCausalLM.from_pretrained(ref.path, dtype=torch.float32)
    moe = upcycle_model(dense, SPEC, InitSpec(method="copy"), seed=0)
    assert (logits(moe, ref.ids) - ref.logits).abs().max() <= 1e-4, f"{name} in memory"
    summary = save_moe(moe, tmp_path / "out", progress=False)
    assert summary["format"] in EXPECTED_FORMATS[HUB[name]["model_type"]] - {OWN_FORMAT}
    assert_same_model(load_export(tmp_path / "out", summary["format"]), ref, f"{name} save_moe -> {summary['format']}")


def test_tiny_recipe_run_on_llama31_keeps_the_rope_scaling(hub_dense, tmp_path, capsys):
    ref = hub_dense("Llama-3.1-8B")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"add {i} and {i + 1}", "output": f"{2 * i + 1}",
                                        "domain": "math"}) + "\n" for i in range(16)))
    out = tmp_path / "run"
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "upcycle_sft.yaml"
    code = main(["run", str(recipe), "--quiet", f"base={ref.path}", f"data.train=[{data}]", f"out={out}",
                 "data.max_length=64", "data.eval_fraction=0.1", "evaluate=false", "post_train.train.epochs=0.5",
                 "post_train.train.batch_size=4", "post_train.save_every=0.5"])
    assert code == 0, capsys.readouterr().err
    model = out / "post_train" / "model"
    config = AutoConfig.from_pretrained(model)
    assert config.model_type == "mixtral"
    assert config.rope_parameters == ref.rope
    assert ref.rope["rope_type"] == "llama3" and ref.rope["rope_theta"] == 500000.0


# Variants of a shipped config, in the transformers-4 layout, for what the hub fixtures do not show.
LLAMA3 = "Meta-Llama-3-8B"
VARIANTS = {
    "rope_linear": (LLAMA3, {"rope_scaling": {"type": "linear", "factor": 4.0}}, {"mixtral", "qwen2_moe"}),
    # dynamic NTK rescales once a sequence exceeds max_position_embeddings
    "rope_dynamic": (LLAMA3, {"rope_scaling": {"type": "dynamic", "factor": 2.0}, "max_position_embeddings": 16},
                     {"mixtral", "qwen2_moe"}),
    "rope_yarn": (LLAMA3, {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
                           "max_position_embeddings": 64}, {"mixtral", "qwen2_moe"}),
    "rope_longrope": (LLAMA3, {"rope_scaling": {"rope_type": "longrope", "original_max_position_embeddings": 16,
                                                "short_factor": [1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7],
                                                "long_factor": [1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5]},
                               "max_position_embeddings": 64}, {"mixtral", "qwen2_moe"}),
    # kept in rope_parameters; these families' default RoPE rotates the whole head regardless (and the
    # dense Llama itself fails with a partial factor under a scaled RoPE, so that is no model to carry)
    "partial_rotary_factor": (LLAMA3, {"partial_rotary_factor": 0.5}, {"mixtral", "qwen2_moe"}),
    "explicit_head_dim": (LLAMA3, {"head_dim": 8}, {"mixtral", "qwen2_moe"}),
    "attention_bias": (LLAMA3, {"attention_bias": True}, set()),   # o_proj bias: no stock MoE class has one
    # layer 0 full attention, layer 1 sliding (Qwen2/Qwen3 slide from max_window_layers on)
    "qwen2_sliding_layers": ("Qwen2.5-0.5B", dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
                             {"qwen2_moe"}),
    "qwen3_sliding_layers": ("Qwen3-0.6B", dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
                             set()),  # Qwen3-MoE slides on every layer or on none
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_config_variants_are_carried_exactly_or_left_to_the_own_format(variant, hub_dense, tmp_path, capsys):
    name, change, native = VARIANTS[variant]
    ref = hub_dense(variant, dict(shrink(HUB[name]), **change))
    cfg = ModelFolder(ref.path).config
    assert {f for f in FORMAT_PREFERENCE if format_problem(MOE_FORMATS[f], cfg, SPEC) is None} == native
    for fmt in sorted(native) + [OWN_FORMAT]:
        build(ref.path, tmp_path / fmt, fmt, capsys)
        assert_same_model(load_export(tmp_path / fmt, fmt), ref, f"{variant} -> {fmt}")


def test_a_format_that_would_change_the_model_is_refused_naming_the_fact(hub_dense, tmp_path, capsys):
    ref = hub_dense("qwen3_sliding_layers", dict(shrink(HUB["Qwen3-0.6B"]), use_sliding_window=True,
                                                 sliding_window=WINDOW, max_window_layers=1))
    code = main(["build", "--quiet", "--base", str(ref.path), "--out", str(tmp_path / "o"), "--format", "qwen3_moe"])
    err = capsys.readouterr().err
    assert code == 2 and "sliding window per layer is [None, 16]" in err and "[16, 16]" in err, err
    assert not (tmp_path / "o").exists()


def test_every_field_of_the_dense_config_classes_is_accounted_for():
    """A field transformers adds to a dense class must be declared a forward fact or harmless here."""
    import dataclasses
    for model_type in EXPECTED_FORMATS:
        fields = {f.name for f in dataclasses.fields(CONFIG_MAPPING[model_type])}
        assert fields <= FACT_FIELDS | NOT_FORWARD_FIELDS, (model_type, fields - FACT_FIELDS - NOT_FORWARD_FIELDS)


# Bad input: one line naming the file and the key, exit 2, nothing written.

def refused(capsys, base: Path, out: Path, *phrases: str) -> str:
    capsys.readouterr()  # drop what writing the dense model printed
    code = main(["build", "--quiet", "--base", str(base), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err and all(line.startswith("upcycle: error: ") for line in err), err
    text = "\n".join(err)
    assert all(p in text for p in phrases), text
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.tmp-*"))
    return text


@pytest.fixture
def small_dense(tmp_path):
    return write_dense(shrink(HUB["Meta-Llama-3-8B"]), tmp_path / "dense")


def edit_config(folder: Path, edit) -> Path:
    path = folder / "config.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    return path


def test_config_json_that_is_not_an_object(capsys, small_dense, tmp_path):
    path = edit_config(small_dense, lambda cfg: [cfg])
    text = refused(capsys, small_dense, tmp_path / "out", str(path), "not an object")
    assert len(text.splitlines()) == 1


def test_config_json_missing_intermediate_size(capsys, small_dense, tmp_path):
    path = edit_config(small_dense, lambda cfg: {k: v for k, v in cfg.items() if k != "intermediate_size"})
    text = refused(capsys, small_dense, tmp_path / "out", str(path), "'intermediate_size'")
    assert len(text.splitlines()) == 1


def test_config_json_with_a_wrongly_typed_size(capsys, small_dense, tmp_path):
    path = edit_config(small_dense, lambda cfg: dict(cfg, hidden_size="64"))
    refused(capsys, small_dense, tmp_path / "out", str(path), "hidden_size='64'")


@pytest.mark.parametrize("key,value", [("rope_interleaved", True), ("sliding_window", 16), ("use_mrope", True),
                                       ("attn_logit_softcapping", 30.0)])
def test_unknown_key_that_may_matter_is_refused_not_dropped(capsys, small_dense, tmp_path, key, value):
    path = edit_config(small_dense, lambda cfg: dict(cfg, **{key: value}))
    refused(capsys, small_dense, tmp_path / "out", str(path), f"{key}={value!r}", "LlamaConfig")


def test_python_api_refuses_an_unknown_key_too(small_dense):
    dense = AutoModelForCausalLM.from_pretrained(small_dense)
    dense.config.rope_interleaved = True
    with pytest.raises(UpcycleError, match="rope_interleaved=True"):
        upcycle_model(dense, SPEC)
