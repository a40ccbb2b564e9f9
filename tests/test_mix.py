"""`upcycle mix`: MoEs from fine-tunes and LoRA adapters of one base, checked against stock transformers/peft."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.conftest import logits_of
from upcycle.cli import main
from upcycle.config import MixConfig
from upcycle.config_io import load_config
from upcycle.errors import UpcycleError
from upcycle.export.load import load_moe
from upcycle.moe.model import moe_blocks
from upcycle.stages import mix
from upcycle.tiny import char_tokenizer, save_tiny_model


def fine_tune(base: Path, out: Path, seed: int, scale: float = 0.05) -> Path:
    """A stand-in for a full fine-tune: every weight of the base moved by seeded noise."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * p.std() * torch.randn(p.shape, generator=g))
    model.save_pretrained(out)
    char_tokenizer().save_pretrained(out)
    return out


def adapter(base: Path, out: Path, seed: int, targets=("gate_proj", "up_proj", "down_proj"), rank=4) -> Path:
    """A peft LoRA adapter of `base` with nonzero (seeded) B, so it changes the model."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                           LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    model.save_pretrained(out)
    return out


def run_mix(base, experts, out, **kw):
    values = {"base": str(base), "experts": [str(e) for e in experts], "out": str(out), "router_init": "random", **kw}
    return mix.run(MixConfig.model_validate(values), progress=False)


@pytest.fixture(scope="module")
def tuned(llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    return {"a": fine_tune(llama_dir, root / "ft_a", 1), "b": fine_tune(llama_dir, root / "ft_b", 2), "root": root}


@pytest.mark.parametrize("fmt", ["mixtral", "qwen2_moe", "upcycle"])
def test_copies_of_one_fine_tune_reproduce_it(llama_dir, tuned, tmp_path, token_ids, fmt):
    ref = logits_of(AutoModelForCausalLM.from_pretrained(tuned["a"], dtype=torch.float32), token_ids)
    run_mix(llama_dir, [tuned["a"]] * 3, tmp_path / "m", export={"format": fmt}, allow_duplicate_experts=True)
    folder = tmp_path / "m" / mix.MODEL
    got = logits_of(load_moe(folder), token_ids)
    assert (got - ref).abs().max() < 1e-4
    if fmt != "upcycle":  # the stock class reads it without upcycle
        stock = logits_of(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), token_ids)
        assert (stock - ref).abs().max() < 1e-4


def test_btx_average_and_named_expert(llama_dir, tuned, tmp_path):
    from safetensors.torch import load_file

    name = "model.layers.0.self_attn.q_proj.weight"
    a, b = (load_file(tuned[k] / "model.safetensors")[name] for k in "ab")
    for shared, want in (("average", (a + b) / 2), (1, b)):
        out = tmp_path / str(shared)
        run_mix(llama_dir, [tuned["a"], tuned["b"]], out, shared=shared, export={"format": "mixtral"})
        got = load_file(out / mix.MODEL / "model.safetensors")
        assert torch.allclose(got[name], want, atol=1e-6)
        # expert 1 of layer 1 is fine-tune b's MLP, unchanged
        block = dict(moe_blocks(load_moe(out / mix.MODEL)))[1]
        assert torch.equal(block.experts.expert(1).gate,
                           load_file(tuned["b"] / "model.safetensors")["model.layers.1.mlp.gate_proj.weight"])


def test_lora_copies_equal_peft_merged_and_compact_equals_materialized(llama_dir, tuned, tmp_path, token_ids):
    from peft import PeftModel

    root = tuned["root"]
    ad, ad2 = adapter(llama_dir, root / "ad_a", 0), adapter(llama_dir, root / "ad_b", 1, rank=2)
    with_attn = adapter(llama_dir, root / "ad_q", 2, targets=("gate_proj", "up_proj", "down_proj", "q_proj"))

    def peft_merged(a):
        return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32), a).merge_and_unload()

    for a, storage, fmt in ((ad, "compact", "upcycle"), (ad, "materialize", "mixtral"), (with_attn, "materialize", "qwen2_moe")):
        out = tmp_path / f"{a.name}-{storage}"
        run_mix(llama_dir, [a, a], out, export={"format": fmt, "lora_storage": storage}, allow_duplicate_experts=True)
        assert (logits_of(load_moe(out / mix.MODEL), token_ids) - logits_of(peft_merged(a), token_ids)).abs().max() < 1e-4
    # two different adapters (ranks 4 and 2): compact (factors) and materialized (W + dW) agree
    run_mix(llama_dir, [ad, ad2], tmp_path / "c2", export={"format": "upcycle", "lora_storage": "compact"})
    run_mix(llama_dir, [ad, ad2], tmp_path / "m2", export={"format": "mixtral"})
    compact = load_moe(tmp_path / "c2" / mix.MODEL)
    assert compact.upcycle_spec.expert_type == "lora" and compact.upcycle_spec.lora.rank == 4  # kept as factors
    assert (logits_of(compact, token_ids) - logits_of(load_moe(tmp_path / "m2" / mix.MODEL), token_ids)).abs().max() < 1e-4
    sizes = [sum(f.stat().st_size for f in (tmp_path / d / mix.MODEL).glob("*.safetensors")) for d in ("c2", "m2")]
    assert sizes[0] < sizes[1]
    # attention deltas cannot live in a compact folder: refused, not dropped
    with pytest.raises(UpcycleError, match="compact keeps only the base's weights .*q_proj"):
        run_mix(llama_dir, [with_attn, with_attn], tmp_path / "c3", export={"format": "upcycle", "lora_storage": "compact"},
                allow_duplicate_experts=True)


def test_bad_experts_are_refused_naming_the_difference(llama_dir, tuned, tmp_path, capsys):
    root = tuned["root"]
    other = save_tiny_model("llama", root / "other_base", seed=7)
    foreign = adapter(other, root / "foreign", 0)
    with pytest.raises(UpcycleError, match="an adapter of .*other_base, not of the base"):
        run_mix(llama_dir, [foreign, foreign], tmp_path / "x1")
    narrow = adapter(llama_dir, root / "narrow", 0, targets=("gate_proj", "up_proj"))
    wide = adapter(llama_dir, root / "wide", 0, targets=("gate_proj", "up_proj", "down_proj"))
    with pytest.raises(UpcycleError, match=r"experts\[1\].*differ from experts\[0\]'s: .*layer 0 down_proj"):
        run_mix(llama_dir, [narrow, wide], tmp_path / "x2")
    stranger = fine_tune(other, root / "ft_other", 3)
    with pytest.raises(UpcycleError, match=r"experts\[1\].*of the base's norm away .*not a fine-tune of this base"):
        run_mix(llama_dir, [tuned["a"], stranger], tmp_path / "x3")
    assert not (tmp_path / "x3" / mix.MODEL).exists()
    with pytest.raises(UpcycleError, match=r"top_k: 3 is larger than the 2 experts"):
        load_config(MixConfig, values={"base": str(llama_dir), "experts": ["a", "b"], "moe": {"top_k": 3}})
    code = main(["mix", "--base", str(llama_dir), "--expert", str(tuned["a"]), "--expert", str(tuned["b"]),
                 "--out", str(tmp_path / "x4"), "--top-k", "3", "--router-init", "random"])
    assert code == 2 and "top_k: 3 is larger than the 2 experts" in capsys.readouterr().err


def test_prompt_and_embedding_routers_match_hand_computation(llama_dir, tuned, tmp_path):
    """prompts: the stock fine-tune's post-attention-norm output (an MoE of copies of it has the same
    hidden states whatever the routing), mean over positive tokens minus negatives, unit rows."""
    from safetensors.torch import load_file

    prompts = [{"positive": ["abc def", "xyz"], "negative": ["123"]}, {"positive": ["hello"]}]
    tok = char_tokenizer()
    stock = AutoModelForCausalLM.from_pretrained(tuned["a"], dtype=torch.float32).eval()

    def norm_out(layer, texts):
        seen = []
        h = stock.model.layers[layer].post_attention_layernorm.register_forward_hook(lambda m, a, o: seen.append(o[0]))
        with torch.no_grad():
            for t in texts:
                stock(torch.tensor([tok(t, add_special_tokens=False)["input_ids"]]))
        h.remove()
        return torch.cat(seen).mean(0)

    run_mix(llama_dir, [tuned["a"]] * 2, tmp_path / "p", router_init="prompts", prompts=prompts, allow_duplicate_experts=True)
    routers = load_file(tmp_path / "p" / mix.ROUTERS)
    for layer in (0, 1):
        rows = torch.stack([norm_out(layer, ["abc def", "xyz"]) - norm_out(layer, ["123"]), norm_out(layer, ["hello"])])
        want = rows / rows.norm(dim=-1, keepdim=True)
        assert torch.allclose(routers[f"model.layers.{layer}.mlp.router.weight"], want, atol=1e-5)
    run_mix(llama_dir, [tuned["a"]] * 2, tmp_path / "e", router_init="cheap_embed", prompts=prompts,
            allow_duplicate_experts=True)
    table = load_file(Path(llama_dir) / "model.safetensors")["model.embed_tokens.weight"]
    ids = lambda texts: torch.tensor([i for t in texts for i in tok(t, add_special_tokens=False)["input_ids"]])  # noqa: E731
    rows = torch.stack([table[ids(["abc def", "xyz"])].mean(0) - table[ids(["123"])].mean(0), table[ids(["hello"])].mean(0)])
    got = load_file(tmp_path / "e" / mix.ROUTERS)["model.layers.1.mlp.router.weight"]
    assert torch.allclose(got, rows / rows.norm(dim=-1, keepdim=True), atol=1e-5)
    with pytest.raises(UpcycleError, match="prompts: 1 entries for 2 experts"):
        load_config(MixConfig, values={"experts": ["a", "b"], "router_init": "prompts", "prompts": prompts[:1]})


def test_ppl_router_init_runs_on_seed_data(llama_dir, tuned, tmp_path):
    rows = [{"instruction": f"q{i}", "output": "a" * (1 + i % 3), "domain": ("x", "y")[i % 2]} for i in range(16)]
    data = tmp_path / "seed.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    result = run_mix(llama_dir, [tuned["a"], tuned["b"]], tmp_path / "r", router_init="ppl",
                     data={"train": [str(data)], "max_length": 32},
                     ppl={"seed_count": 8, "train": {"epochs": 1, "batch_size": 4, "lr": 0.05}})
    report = result["routing"]
    assert len(report["owners"]) == 8 and len(report["ppl"][0]) == 2
    # owners are the lowest-perplexity expert of each sample (empty buckets aside)
    assert all(o == min(range(2), key=lambda e: p[e]) for o, p in zip(report["owners"], report["ppl"])) or report["notes"]
    manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["kind"] == "ffn" and len(manifest["experts"]) == 2


def test_lora_experts_keep_their_own_scale_in_the_moe(llama_dir, tuned, tmp_path):
    """Experts sharing alpha/r keep it in the MoE with B as trained (so post-training moves B as
    stage 1 did: LoRAMoE and UpIT train at one effective scale); different scales are folded into B."""
    from safetensors.torch import load_file

    root = tuned["root"]
    a, b = adapter(llama_dir, root / "s_a", 3, rank=4), adapter(llama_dir, root / "s_b", 4, rank=4)  # alpha 8: scale 2
    run_mix(llama_dir, [a, b], tmp_path / "same", export={"format": "upcycle", "lora_storage": "compact"})
    moe = load_moe(tmp_path / "same" / mix.MODEL)
    assert moe.upcycle_spec.lora.alpha / moe.upcycle_spec.lora.rank == 2.0
    block = dict(moe_blocks(moe))[0]
    b_a = load_file(a / "adapter_model.safetensors")["base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"]
    assert torch.equal(block.experts.lora_B["up_proj"][0].detach(), b_a)  # not doubled
    odd = adapter(llama_dir, root / "s_c", 5, rank=4)
    config = json.loads((odd / "adapter_config.json").read_text())
    (odd / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 2}))  # scale 0.5
    run_mix(llama_dir, [a, odd], tmp_path / "mixed", export={"format": "upcycle", "lora_storage": "compact"})
    moe = load_moe(tmp_path / "mixed" / mix.MODEL)
    assert moe.upcycle_spec.lora.alpha / moe.upcycle_spec.lora.rank == 1.0
    block = dict(moe_blocks(moe))[0]
    assert torch.allclose(block.experts.lora_B["up_proj"][0].detach(), 2 * b_a)
