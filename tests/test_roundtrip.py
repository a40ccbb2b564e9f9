"""Round trips: in memory -> disk -> stock transformers (or load_moe) gives the same model, tensor for tensor."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from tests.conftest import logits_of
from upcycle import load_moe, save_moe, upcycle_model
from upcycle.config import BuildConfig, ExportSpec, InitSpec, MoESpec
from upcycle.errors import UpcycleError
from upcycle.export.save import resolve_format
from upcycle.moe.block import MoEBlock
from upcycle.moe.model import moe_blocks
from upcycle.stages import build


def read_all(folder):
    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as fh:
            for k in fh.keys():
                assert k not in tensors, f"{k} written twice"
                tensors[k] = fh.get_tensor(k)
    return tensors


def test_drop_upcycled_mixtral_round_trip(llama_dir, tmp_path, token_ids):
    dense = AutoModelForCausalLM.from_pretrained(llama_dir)
    dense_mlp = dense.model.layers[0].mlp.gate_proj.weight.clone()
    spec = MoESpec(num_experts=4, top_k=2, router_init_std=0.3)
    moe = upcycle_model(dense, spec, InitSpec(method="drop", drop_ratio=0.5), seed=3)
    in_memory = logits_of(moe, token_ids)
    save_moe(moe, tmp_path / "out", format="mixtral", progress=False)
    stock, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert type(stock).__name__ == "MixtralForCausalLM"
    # Every tensor of the stock model came from the file and every file tensor was used.
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert (logits_of(stock, token_ids) - in_memory).abs().max() <= 1e-5

    tensors = read_all(tmp_path / "out")
    for l, block in moe_blocks(moe):
        names = [f"model.layers.{l}.block_sparse_moe.experts.{e}.{w}.weight" for e in range(4) for w in ("w1", "w2", "w3")]
        assert all(n in tensors for n in names)
        for e in range(4):
            assert torch.equal(tensors[f"model.layers.{l}.block_sparse_moe.experts.{e}.w1.weight"], block.experts.gate_proj[e])
            assert torch.equal(tensors[f"model.layers.{l}.block_sparse_moe.experts.{e}.w2.weight"], block.experts.down_proj[e])
    # After drop every expert differs from the others and from the dense MLP.
    gates = [tensors[f"model.layers.0.block_sparse_moe.experts.{e}.w1.weight"] for e in range(4)]
    for a in range(4):
        assert not torch.equal(gates[a], dense_mlp)
        for b in range(a + 1, 4):
            assert not torch.equal(gates[a], gates[b])
    assert len(tensors) == 2 * (4 * 3 + 1 + 6) + 2  # layers x (experts x 3 + router + attention/norms) + embed + norm


def test_streaming_build_equals_in_memory_upcycle(llama_dir, tmp_path):
    """Two paths, one result: `upcycle build` streams from disk; upcycle_model works in memory."""
    spec, init = MoESpec(num_experts=4, top_k=2), InitSpec(method="drop", drop_ratio=0.25)
    build.run(BuildConfig(base=llama_dir, out=tmp_path / "streamed", moe=spec, init=init, seed=11), progress=False)
    moe = upcycle_model(AutoModelForCausalLM.from_pretrained(llama_dir), spec, init, seed=11)
    save_moe(moe, tmp_path / "memory", format="mixtral", progress=False)
    a, b = read_all(tmp_path / "streamed"), read_all(tmp_path / "memory")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_same_seed_same_bytes_other_seed_other_experts(llama_dir, tmp_path):
    spec, init = MoESpec(num_experts=2, top_k=1), InitSpec(method="drop")
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        build.run(BuildConfig(base=llama_dir, out=tmp_path / name, moe=spec, init=init, seed=seed), progress=False)
    data = {n: (tmp_path / n / "model.safetensors").read_bytes() for n in "abc"}
    assert data["a"] == data["b"]
    assert data["a"] != data["c"]


def test_sharded_bf16_output_loads(llama_dir, tmp_path, token_ids):
    out = tmp_path / "sharded"
    summary = build.run(BuildConfig(base=llama_dir, out=out, moe=MoESpec(num_experts=4, top_k=2),
                                    export=ExportSpec(max_shard_size="20KB", dtype="bfloat16")), progress=False)
    assert len(summary["files"]) > 3
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(summary["files"])
    stock = AutoModelForCausalLM.from_pretrained(out)
    assert stock.dtype == torch.bfloat16
    dense = AutoModelForCausalLM.from_pretrained(llama_dir)
    diff = (logits_of(stock, token_ids).float() - logits_of(dense, token_ids)).abs().max()
    assert diff < 0.1  # bf16 rounding only


def test_qwen2_moe_with_dense_layers_and_gated_shared_experts(dense_dirs, tmp_path, token_ids):
    dense = AutoModelForCausalLM.from_pretrained(dense_dirs["qwen2"])
    spec = MoESpec(num_experts=8, top_k=4, granularity=2, routing="softmax_topk", num_shared_experts=2,
                   shared_expert_gate=True, layers=[1], router_init_std=0.3)
    moe = upcycle_model(dense, spec, InitSpec(method="virtual_group", weight_scaling="nvidia"), seed=0)
    assert not isinstance(moe.model.layers[0].mlp, MoEBlock) and isinstance(moe.model.layers[1].mlp, MoEBlock)
    ref = logits_of(moe, token_ids)
    save_moe(moe, tmp_path / "q", progress=False)  # auto -> qwen2_moe: softmax_topk + gated shared expert
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert type(stock).__name__ == "Qwen2MoeForCausalLM"
    assert stock.config.mlp_only_layers == [0] and stock.config.shared_expert_intermediate_size == 64  # 2 shared experts of width I/G = 32
    assert (logits_of(stock, token_ids) - ref).abs().max() <= 1e-5


def test_own_format_round_trip_for_ungated_shared_experts(llama_dir, tmp_path, token_ids):
    """No stock class has ungated shared experts with Mixtral routing: auto falls back to the own format."""
    spec = MoESpec(num_experts=4, top_k=2, num_shared_experts=1, router_init_std=0.3)
    moe = upcycle_model(AutoModelForCausalLM.from_pretrained(llama_dir), spec, InitSpec(method="noise"), seed=0)
    ref = logits_of(moe, token_ids)
    summary = save_moe(moe, tmp_path / "own", progress=False)
    assert summary["format"] == "upcycle"
    assert not (tmp_path / "own" / "config.json").exists()  # stock transformers must not load it as a dense model
    loaded = load_moe(tmp_path / "own")
    assert (logits_of(loaded, token_ids) - ref).abs().max() == 0


def lora_moe(llama_dir, seed=0):
    spec = MoESpec(num_experts=4, top_k=2, expert_type="lora", router_init_std=0.3)
    moe = upcycle_model(AutoModelForCausalLM.from_pretrained(llama_dir), spec, InitSpec(), seed=seed)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # as if trained: B != 0 so the experts differ
        for _, block in moe_blocks(moe):
            for b in block.experts.lora_B.values():
                b.copy_(0.05 * torch.randn(b.shape, generator=g))
    return moe


def test_lora_experts_materialized_into_mixtral(llama_dir, tmp_path, token_ids):
    moe = lora_moe(llama_dir)
    ref = logits_of(moe, token_ids)
    save_moe(moe, tmp_path / "m", format="mixtral", progress=False)
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert (logits_of(stock, token_ids) - ref).abs().max() <= 1e-5
    # expert e = W + (alpha/r) B_e A_e, exactly as defined
    block = moe.model.layers[0].mlp
    w1 = read_all(tmp_path / "m")["model.layers.0.block_sparse_moe.experts.2.w1.weight"]
    expected = block.experts.gate_proj + 2.0 * block.experts.lora_B["gate_proj"][2] @ block.experts.lora_A["gate_proj"][2]
    assert torch.allclose(w1, expected, atol=1e-6)


def test_lora_experts_compact_round_trip(llama_dir, tmp_path, token_ids):
    moe = lora_moe(llama_dir)
    ref = logits_of(moe, token_ids)
    save_moe(moe, tmp_path / "c", lora_storage="compact", base_path=llama_dir, progress=False)
    stored = read_all(tmp_path / "c")
    assert all(".experts.lora_" in k or ".router." in k for k in stored)  # adapters and routers only
    loaded = load_moe(tmp_path / "c")
    assert (logits_of(loaded, token_ids) - ref).abs().max() == 0


def test_compact_lora_refuses_the_wrong_base(llama_dir, dense_dirs, tmp_path):
    moe = lora_moe(llama_dir)
    save_moe(moe, tmp_path / "c", lora_storage="compact", base_path=llama_dir, progress=False)
    with pytest.raises(UpcycleError, match="not the dense model"):
        load_moe(tmp_path / "c", base=dense_dirs["mistral"])


@pytest.mark.parametrize("model_type,routing,shared,expected", [
    ("llama", "topk_softmax", 0, "mixtral"),
    ("llama", "softmax_topk", 0, "qwen2_moe"),
    ("qwen2", "topk_softmax", 0, "qwen2_moe"),
    ("qwen3", "softmax_topk", 0, "qwen3_moe"),
    ("llama", "topk_softmax", 1, "upcycle"),
])
def test_auto_format_choice(model_type, routing, shared, expected, dense_dirs):
    cfg = json.loads((dense_dirs[model_type] / "config.json").read_text())
    target = resolve_format("auto", cfg, MoESpec(routing=routing, num_shared_experts=shared))
    assert (target if isinstance(target, str) else target.name) == expected
