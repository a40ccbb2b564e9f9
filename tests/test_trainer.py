"""The in-memory MoE trains with the stock HF Trainer: losses include the router terms, frozen weights stay frozen."""

import torch
from torch.utils.data import Dataset
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from upcycle import upcycle_model
from upcycle.config import InitSpec, MoESpec
from upcycle.moe.model import moe_blocks


class Repeat(Dataset):
    def __init__(self, ids):
        self.ids = ids

    def __len__(self):
        return 16

    def __getitem__(self, i):
        row = self.ids[i % len(self.ids)]
        return {"input_ids": row, "labels": row.clone(), "attention_mask": torch.ones_like(row)}


def train(model, tmp_path, steps=12):
    ids = torch.randint(6, 128, (4, 12), generator=torch.Generator().manual_seed(0))
    args = TrainingArguments(output_dir=str(tmp_path / "t"), max_steps=steps, per_device_train_batch_size=4,
                             learning_rate=5e-3, report_to=[], save_strategy="no", logging_steps=1, use_cpu=True,
                             disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=Repeat(ids))
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_trainer_updates_routers_and_experts(llama_dir, tmp_path):
    moe = upcycle_model(AutoModelForCausalLM.from_pretrained(llama_dir), MoESpec(num_experts=4, top_k=2, z_loss_coef=1e-3),
                        InitSpec(), seed=0)
    before = {n: p.detach().clone() for n, p in moe.named_parameters()}
    losses = train(moe, tmp_path)
    assert losses[-1] < losses[0]
    after = dict(moe.named_parameters())
    assert not torch.equal(before["model.layers.0.mlp.router.weight"], after["model.layers.0.mlp.router.weight"])
    assert not torch.equal(before["model.layers.1.mlp.experts.gate_proj"], after["model.layers.1.mlp.experts.gate_proj"])


def test_lora_experts_train_only_adapters_and_routers(llama_dir, tmp_path):
    moe = upcycle_model(AutoModelForCausalLM.from_pretrained(llama_dir), MoESpec(num_experts=4, top_k=2, expert_type="lora"),
                        InitSpec(), seed=0)
    before = {n: p.detach().clone() for n, p in moe.named_parameters()}
    train(moe, tmp_path, steps=4)
    for _, block in moe_blocks(moe):
        assert not block.experts.gate_proj.requires_grad
    after = dict(moe.named_parameters())
    assert torch.equal(before["model.layers.0.mlp.experts.gate_proj"], after["model.layers.0.mlp.experts.gate_proj"])
    assert not torch.equal(before["model.layers.0.mlp.experts.lora_B.up_proj"], after["model.layers.0.mlp.experts.lora_B.up_proj"])


def test_loss_includes_router_terms_only_in_training(llama_dir):
    spec = MoESpec(num_experts=4, top_k=2, aux_loss_coef=0.1, z_loss_coef=0.01, router_init_std=0.3)
    moe = upcycle_model(AutoModelForCausalLM.from_pretrained(llama_dir), spec, InitSpec(), seed=0)
    ids = torch.randint(6, 128, (2, 9), generator=torch.Generator().manual_seed(4))
    dense = AutoModelForCausalLM.from_pretrained(llama_dir)
    with torch.no_grad():
        lm = dense(ids, labels=ids).loss  # copy init + topk_softmax: the MoE's LM loss is the dense one
        moe.eval()
        out_eval = moe(ids, labels=ids)
        moe.train()
        out_train = moe(ids, labels=ids)
    from upcycle.moe.model import moe_aux_losses
    aux = moe_aux_losses(moe)
    assert abs(out_eval.loss.item() - lm.item()) < 1e-5
    expected = lm + 0.1 * aux["aux_loss"] + 0.01 * aux["z_loss"]
    assert abs(out_train.loss.item() - expected.item()) < 1e-5
    assert out_train.aux_loss.item() == aux["aux_loss"].item()
