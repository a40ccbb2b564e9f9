"""The grouped experts path (tokens sorted by expert, grouped GEMMs) against the eager loop, a per-token
reference written out by hand, and the stock transformers MoE classes' gradients."""

import pytest
import torch
import torch.nn.functional as F

from tests.test_parity import stock_model
from upcycle import load_moe
from upcycle.config import LoRAExpertSpec, MoESpec
from upcycle.errors import UpcycleError
from upcycle.moe.block import MoEBlock
from upcycle.moe.experts import IMPLEMENTATION_ENV, LoRAExperts, MLPExperts, set_experts_implementation

H, I = 32, 64
SPECS = {
    "full": MoESpec(num_experts=4, top_k=2),
    "fine_grained_g8": MoESpec(num_experts=16, top_k=8, granularity=8, routing="softmax_topk"),
    "shared_gated": MoESpec(num_experts=8, top_k=2, granularity=2, num_shared_experts=2, shared_expert_gate=True,
                            routing="softmax_topk_renorm"),
    "top1": MoESpec(num_experts=4, top_k=1),
    "lora": MoESpec(num_experts=4, top_k=2, expert_type="lora", lora=LoRAExpertSpec(rank=8, alpha=4)),
    "lora_up_only": MoESpec(num_experts=4, top_k=2, expert_type="lora", lora=LoRAExpertSpec(rank=8, targets=["up_proj"])),
    "odd_widths": MoESpec(num_experts=4, top_k=2, granularity=4),  # I_e = 4 with H = 20: the segmented fallback
}


def random_block(spec: MoESpec, hidden: int = H, seed: int = 0) -> MoEBlock:
    """A block with every weight random (LoRA B too, so the deltas matter), all trainable."""
    block = MoEBlock(spec, hidden, I, "silu", experts_implementation="eager")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return block.requires_grad_(True)


def run(block: MoEBlock, impl: str, x: torch.Tensor):
    """Output, input grad and parameter grads of sum(y * r) for a fixed random r."""
    set_experts_implementation(block, impl)
    block.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    y = block(x)
    g = torch.Generator(device=y.device).manual_seed(5)  # drawn where y lives: no host-to-device copy
    r = torch.randn(y.shape, generator=g, device=y.device).to(y.dtype)
    (y * r).sum().backward()
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in block.named_parameters()}
    return y.detach(), x.grad, grads


def per_token_reference(block: MoEBlock, x: torch.Tensor) -> torch.Tensor:
    """sum_k w_k * MLP_{e_k}(x_t) token by token, from each expert's materialized weights."""
    flat = x.reshape(-1, x.shape[-1])
    _, weights, indices = block.router(flat)
    rows = []
    for t in range(flat.shape[0]):
        acc = torch.zeros(flat.shape[-1])
        for w, e in zip(weights[t].tolist(), indices[t].tolist()):
            ex = block.experts.expert(e)
            acc += w * (F.silu(ex.gate @ flat[t]) * (ex.up @ flat[t])) @ ex.down.T
        if block.shared_experts is not None:
            s = block.shared_experts.weights()
            shared = (F.silu(s.gate @ flat[t]) * (s.up @ flat[t])) @ s.down.T
            acc += torch.sigmoid(block.shared_expert_gate.weight[0] @ flat[t]) * shared
        rows.append(acc)
    return torch.stack(rows).reshape(x.shape)


def assert_close_rel(a: torch.Tensor, b: torch.Tensor, rel: float) -> None:
    scale = b.abs().max().clamp_min(1e-12)
    assert ((a - b).abs().max() / scale).item() <= rel


@pytest.mark.parametrize("name", list(SPECS))
def test_grouped_forward_and_grads_equal_eager(name):
    hidden = 20 if name == "odd_widths" else H
    block = random_block(SPECS[name], hidden)
    x = torch.randn(3, 7, hidden, generator=torch.Generator().manual_seed(1))
    y_ref, gx_ref, gp_ref = run(block, "eager", x)
    y, gx, gp = run(block, "grouped", x)
    with torch.no_grad():
        manual = per_token_reference(block, x)
    assert_close_rel(y_ref, manual, 1e-5)  # both paths against a reference that shares none of their code
    assert_close_rel(y, manual, 1e-5)
    assert_close_rel(gx, gx_ref, 1e-5)
    assert gp.keys() == gp_ref.keys()
    for n in gp:
        assert_close_rel(gp[n], gp_ref[n], 1e-5)
    trained = [n for n in gp if "experts." in n and gp_ref[n].abs().sum() > 0]
    assert trained  # the comparison covered real expert gradients


def test_grouped_uses_torch_grouped_mm_and_never_syncs(monkeypatch):
    """On CPU with 16-byte rows the grouped path runs torch's grouped GEMM, one per projection, and
    neither forward nor backward reads a tensor back to the host (.tolist/.item/.nonzero)."""
    block = set_experts_implementation(random_block(SPECS["fine_grained_g8"]), "grouped")
    x = torch.randn(2, 5, H, requires_grad=True)
    calls = []
    real = F.grouped_mm
    monkeypatch.setattr(F, "grouped_mm", lambda *a, **k: calls.append(1) or real(*a, **k))

    def no_sync(*_a, **_k):
        raise AssertionError("host sync on the grouped path")
    for method in ("tolist", "item", "nonzero"):
        monkeypatch.setattr(torch.Tensor, method, no_sync)
    monkeypatch.setattr(torch, "nonzero", no_sync)
    block.experts(x.reshape(-1, H), *reversed(block.router(x.reshape(-1, H))[1:])).sum().backward()
    monkeypatch.undo()
    assert len(calls) == 3  # gate, up, down
    assert block.experts.gate_proj.grad.abs().sum() > 0


def test_experts_without_tokens_get_zero_grads_and_empty_batches_work():
    spec = SPECS["full"]
    block = random_block(spec)
    with torch.no_grad():  # experts 2 and 3 can never win: every token goes to 0 and 1
        block.router.weight[2:].fill_(0.0)
        block.router.weight[:2].zero_()
        block.router.weight[0, 0] = 50.0
        block.router.weight[1, 0] = 49.0
    x = torch.randn(2, 6, H)
    x[..., 0] = x[..., 0].abs() + 1.0
    for impl in ("eager", "grouped"):
        _, _, grads = run(block, impl, x)
        assert grads["experts.gate_proj"][2:].abs().sum() == 0 and grads["experts.down_proj"][2:].abs().sum() == 0
        assert grads["experts.gate_proj"][:2].abs().sum() > 0
        empty = block(torch.zeros(1, 0, H))
        assert empty.shape == (1, 0, H)


def test_forced_experts_grouped_equals_eager():
    """Route scoring's forced experts (every token of row b to one expert, k = 1) on both paths."""
    block = random_block(SPECS["lora"])
    x = torch.randn(4, 3, H)
    outs = []
    for impl in ("eager", "grouped"):
        set_experts_implementation(block, impl)
        block.forced_experts = torch.tensor([0, 3, 3, 1])
        with torch.no_grad():
            outs.append(block(x))
        block.forced_experts = None
    assert_close_rel(outs[1], outs[0], 1e-5)
    # Row 1 with expert 3 alone is expert 3's MLP exactly.
    e3 = block.experts.expert(3)
    with torch.no_grad():
        want = (F.silu(x[1] @ e3.gate.T) * (x[1] @ e3.up.T)) @ e3.down.T
    assert_close_rel(outs[1][1], want, 1e-5)


def test_bf16_grouped_tracks_fp32_eager():
    block = random_block(SPECS["fine_grained_g8"])
    x = torch.randn(2, 8, H, generator=torch.Generator().manual_seed(2))
    ref, _, grads_ref = run(block, "eager", x)
    low = block.to(torch.bfloat16)
    y, _, grads = run(low, "grouped", x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    assert_close_rel(y.float(), ref, 3e-2)
    assert_close_rel(grads["experts.down_proj"].float(), grads_ref["experts.down_proj"], 3e-2)


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "qwen3_moe"])
@pytest.mark.parametrize("impl", ["eager", "grouped"])
def test_training_grads_match_stock_class(tmp_path, token_ids, model_type, impl):
    """Loss and expert/router gradients equal the stock class's (its default grouped_mm experts)."""
    stock = stock_model(model_type)
    stock.save_pretrained(tmp_path / "stock")
    ours = set_experts_implementation(load_moe(tmp_path / "stock"), impl)
    ours.upcycle_spec = ours.upcycle_spec.model_copy(update={"aux_loss_scope": "global"})
    stock.config.output_router_logits = True
    stock.train()
    ours.train()
    ref = stock(token_ids, labels=token_ids, output_router_logits=True)
    out = ours(token_ids, labels=token_ids)
    assert out.loss.item() == pytest.approx(ref.loss.item(), rel=1e-5)
    ref.loss.backward()
    out.loss.backward()
    stock_layer = stock.model.layers[0].mlp
    block = ours.model.layers[0].mlp
    gate_up = stock_layer.experts.gate_up_proj.grad  # (E, 2*I_e, H): gate rows, then up rows
    width = block.experts.gate_proj.shape[1]
    assert_close_rel(block.experts.gate_proj.grad, gate_up[:, :width], 1e-4)
    assert_close_rel(block.experts.up_proj.grad, gate_up[:, width:], 1e-4)
    assert_close_rel(block.experts.down_proj.grad, stock_layer.experts.down_proj.grad, 1e-4)
    assert_close_rel(block.router.weight.grad, stock_layer.gate.weight.grad, 1e-4)


def test_choosing_an_implementation():
    block = MoEBlock(SPECS["full"], H, I, "silu", experts_implementation="grouped")
    assert isinstance(block.experts, MLPExperts) and block.experts.implementation == "grouped"
    lora = set_experts_implementation(MoEBlock(SPECS["lora"], H, I, "silu"), "eager")
    assert isinstance(lora.experts, LoRAExperts) and lora.experts.implementation == "eager"
    with pytest.raises(UpcycleError, match="experts_implementation='fast'.*auto, eager, grouped"):
        set_experts_implementation(block, "fast")


def test_environment_default(monkeypatch):
    monkeypatch.setenv(IMPLEMENTATION_ENV, "eager")
    assert MoEBlock(SPECS["full"], H, I, "silu").experts.implementation == "eager"
    monkeypatch.setenv(IMPLEMENTATION_ENV, "fastest")
    with pytest.raises(UpcycleError, match=IMPLEMENTATION_ENV):
        MoEBlock(SPECS["full"], H, I, "silu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["full", "fine_grained_g8", "lora"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_grouped_equals_eager_without_host_sync(name, dtype):
    block = random_block(SPECS[name]).cuda()
    x = torch.randn(4, 64, H, generator=torch.Generator().manual_seed(1)).cuda()
    y_ref, gx_ref, gp_ref = run(block.float(), "eager", x.float())
    block = block.to(dtype)
    run(block, "grouped", x.to(dtype))  # warm-up: lazy CUDA initialisation may sync once
    torch.cuda.synchronize()
    # bf16 runs torch's grouped kernel, which must not sync; fp32 on CUDA is torch's slower fallback.
    torch.cuda.set_sync_debug_mode("error" if dtype == torch.bfloat16 else "default")
    try:
        y, gx, gp = run(block, "grouped", x.to(dtype))
        torch.cuda.synchronize()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    rel = 1e-5 if dtype == torch.float32 else 3e-2
    assert_close_rel(y.float(), y_ref, rel)
    assert_close_rel(gx.float(), gx_ref, rel)
    for n in gp:
        assert_close_rel(gp[n].float(), gp_ref[n], rel if "router" not in n else 10 * rel)
