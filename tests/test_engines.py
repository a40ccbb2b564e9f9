"""Training engines: gradient checkpointing, peft LoRA over the MoE, FSDP2 and DeepSpeed ZeRO through the Trainer.

Gradient checkpointing must change memory, not math: the same loss and gradients (fp32, CPU), with the
MoE blocks (or dense MLPs) run twice per step, the second time in backward.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import Trainer, TrainerCallback
from transformers.loss.loss_utils import ForCausalLMLoss

from upcycle.config import LoRATrainSpec, MoESpec, TrainSpec
from upcycle.errors import UpcycleError
from upcycle.moe.block import MoEBlock
from upcycle.moe.losses import load_balancing_loss, router_z_loss
from upcycle.moe.model import moe_blocks, router_logits, upcycle_model
from upcycle.tiny import tiny_model
from upcycle.train.engine import apply_lora, engine_problems, fsdp_arguments, training_arguments
from tests.engine_worker import dataset

ROOT = Path(__file__).resolve().parents[1]


class Grads(TrainerCallback):
    """Keeps the gradients of the first optimizer step (after clipping, before the update)."""

    def __init__(self, model):
        self.model, self.grads = model, None

    def on_pre_optimizer_step(self, args, state, control, **kw):
        if self.grads is None:
            self.grads = {n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None}


def one_step(model, checkpointing: bool, tmp_path, counted: type):
    """Loss, gradients and forward calls of `counted` modules for one Trainer step through train/engine.py."""
    calls = []
    handles = [m.register_forward_pre_hook(lambda *a: calls.append(1)) for m in model.modules() if isinstance(m, counted)]
    spec = TrainSpec(lr=1e-3, warmup_ratio=0, batch_size=4, epochs=1, sampler="sequential", precision="fp32",
                     gradient_checkpointing=checkpointing, max_grad_norm=0)
    args = training_arguments(spec, tmp_path / f"gc{checkpointing}", 0, moe=True, progress=False, max_steps=1)
    grads = Grads(model)
    trainer = Trainer(model=model, args=args, train_dataset=dataset(rows=4), callbacks=[grads])
    loss = trainer.train().training_loss
    for h in handles:
        h.remove()
    return loss, grads.grads, len(calls)


def moe_model():
    # Router jitter draws random numbers in the block: checkpointing must replay the same draws.
    spec = MoESpec(num_experts=4, top_k=2, aux_loss_coef=0.1, z_loss_coef=0.01, router_jitter=0.2)
    return upcycle_model(tiny_model("llama", 0), spec, seed=1)


def lora_model():
    torch.manual_seed(0)
    return apply_lora(tiny_model("llama", 0), LoRATrainSpec(dropout=0.1))  # dropout: replayed draws again


@pytest.mark.parametrize("make,counted", [(moe_model, MoEBlock), (lora_model, "mlp")], ids=["moe-post-train", "dense-lora-prepare"])
def test_gradient_checkpointing_recomputes_and_changes_no_number(make, counted, tmp_path):
    if counted == "mlp":
        counted = type(tiny_model("llama", 0).model.layers[0].mlp)
    plain = one_step(make(), False, tmp_path, counted)
    ckpt = one_step(make(), True, tmp_path, counted)
    layers = tiny_model("llama", 0).config.num_hidden_layers
    assert plain[2] == layers and ckpt[2] == 2 * layers  # recomputed once in backward
    assert ckpt[0] == pytest.approx(plain[0], rel=1e-6)
    assert plain[1].keys() == ckpt[1].keys() and len(plain[1]) > 0
    for name, g in plain[1].items():
        torch.testing.assert_close(ckpt[1][name], g, rtol=1e-5, atol=1e-7, msg=name)
    if make is moe_model:  # the routers got the aux/z-loss gradient under checkpointing too
        assert all(ckpt[1][n].abs().sum() > 0 for n in ckpt[1] if "router" in n)


def test_reentrant_checkpointing_that_would_drop_the_router_losses_is_refused():
    """torch's reentrant checkpoint runs the layers under no_grad: the router logits the aux loss is
    built from then have no graph, so the routers would silently get no balancing gradient."""
    model = moe_model().train()
    ids = dataset(rows=2)[0]["input_ids"][None]
    model.activation_checkpointing_enable({"use_reentrant": True})
    with pytest.raises(UpcycleError, match="router losses have no gradient"):
        model(input_ids=ids, labels=ids)
    model.activation_checkpointing_enable({"use_reentrant": False})
    assert model(input_ids=ids, labels=ids).loss.requires_grad


def test_peft_lora_over_the_moe_trains_and_keeps_the_router_losses():
    """peft LoRA on the attention projections of an upcycled MoE: the MoE blocks stay in place, the
    output at init is the MoE's own, the loss is LM + aux + z (recomputed here from the stock loss
    and the router logits), only the adapters change, and training lowers the loss."""
    model = moe_model()
    ids = torch.stack([r["input_ids"] for r in dataset(rows=4)])
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    routers = {n: p.detach().clone() for n, p in model.named_parameters() if "router" in n}
    torch.manual_seed(0)
    peft_model = apply_lora(model, LoRATrainSpec(targets=["q_proj", "v_proj"], dropout=0.0))
    assert len(list(moe_blocks(peft_model.base_model.model))) == model.config.num_hidden_layers
    peft_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, before, rtol=0, atol=0)  # LoRA B = 0
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and ("q_proj" in n or "v_proj" in n) for n in trainable)

    peft_model.train()
    for b in (b for _, b in moe_blocks(model)):
        b.router.jitter = 0.0  # a deterministic forward, to recompute the loss below
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        out = peft_model(input_ids=ids, labels=ids)
        logits = router_logits(model)
        spec = model.upcycle_spec
        expected = (ForCausalLMLoss(out.logits, ids, model.config.vocab_size)
                    + spec.aux_loss_coef * load_balancing_loss(logits, spec.top_k, spec.aux_loss_scope)
                    + spec.z_loss_coef * router_z_loss(logits))
        assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    assert all(torch.equal(p, routers[n]) for n, p in model.named_parameters() if "router" in n)


def test_fsdp_arguments_match_transformers_own_reading_of_the_fsdp_options(tmp_path):
    """train.fsdp's words become the fsdp_config the Trainer reads, as transformers itself translates its
    (deprecated) option strings; and on CPU the silent DDP fallback is refused with the reason."""
    from transformers import TrainingArguments

    for words in ("full_shard auto_wrap", "shard_grad_op", "full_shard offload"):
        ours = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, **fsdp_arguments(TrainSpec(fsdp=words)))
        stock = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, fsdp=words)
        assert ours.fsdp_plugin_args == stock.fsdp_plugin_args and ours.fsdp_plugin_args["fsdp_version"] == 2
    assert fsdp_arguments(TrainSpec()) == {}
    assert fsdp_arguments(TrainSpec(fsdp_config={"activation_checkpointing": True}))["fsdp_config"]["activation_checkpointing"]
    assert engine_problems(TrainSpec(fsdp="full_shard"), gpu=True) == []
    (problem,) = engine_problems(TrainSpec(fsdp="full_shard"), gpu=False)
    assert "silently train with DDP" in problem and "train.fsdp" in problem
    if not torch.cuda.is_available():
        with pytest.raises(UpcycleError, match="FSDP needs GPUs"):
            training_arguments(TrainSpec(fsdp="full_shard"), tmp_path, 0)
    with pytest.raises(UpcycleError, match="unknown FSDP option"):
        from upcycle.config import PostTrainConfig
        from upcycle.config_io import load_config
        load_config(PostTrainConfig, None, ["train.fsdp=full_shard sharded"])


def run_worker(mode: str, out: Path) -> dict:
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "engine_worker.py"), mode, str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out / "result.pt")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fsdp", "zero2", "zero3"])
def test_sharded_engine_trains_the_moe_like_ddp(mode, tmp_path):
    """2 CPU processes, same data and seed: FSDP2 (decoder layers auto-wrapped from `_no_split_modules`,
    MoE blocks inside them) and DeepSpeed ZeRO-2/3 against DDP. Tolerance: losses 1e-6 relative,
    weights 1e-5 absolute after 4 AdamW steps (measured: FSDP2 equal, ZeRO-2 1.2e-7, ZeRO-3 6e-7)."""
    if mode.startswith("zero"):
        pytest.importorskip("deepspeed")
    ddp = run_worker("ddp", tmp_path / "ddp")
    other = run_worker(mode, tmp_path / mode)
    assert ddp["wrapped"] == "DistributedDataParallel"
    assert other["wrapped"] == ("FSDPLlamaForCausalLM" if mode == "fsdp" else "DeepSpeedEngine")
    if mode == "fsdp":
        assert other["layer"] == "FSDPLlamaDecoderLayer" and other["mlp"] == "MoEBlock"
    whole = ddp["state"]["model.layers.0.mlp.router.weight"].numel()
    assert ddp["router_numel_here"] == whole
    assert (other["router_numel_here"] < whole) == (mode != "zero2")  # ZeRO-2 shards only gradients and states
    assert len(other["losses"]) == len(ddp["losses"]) == 4
    assert other["losses"] == pytest.approx(ddp["losses"], rel=1e-6)
    assert other["state"].keys() == ddp["state"].keys()
    for k, v in ddp["state"].items():
        torch.testing.assert_close(other["state"][k], v, rtol=0, atol=1e-5, msg=k)
