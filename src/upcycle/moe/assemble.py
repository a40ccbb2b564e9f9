"""Assemble UpIT's MoE in memory from the stage outputs: experts (stage 2), routers (stage 3),
and the weights outside the experts (stage 1).

    FFN experts   expert e of layer l = expert e's MLP at layer l; attention, norms and embeddings
                  are the average of the stage-1 checkpoints in the pool (default, as
                  Branch-Train-MiX does) or the last of them.
    LoRA experts  the frozen dense MLP plus expert e's LoRA factors, brought to one common rank
                  (zero-padded, exact) with each expert's alpha/r folded into B; LoRA deltas outside
                  the MLP (attention, if stage 1 trained them) are averaged and merged into the base.
Routers come from the route stage's file, or are drawn fresh (seeded) when router init is off.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import torch

from upcycle.config import MoESpec
from upcycle.errors import UpcycleError
from upcycle.experts import LoRAExpert, open_expert
from upcycle.io.safetensors_io import SafetensorsReader
from upcycle.moe.block import MoEBlock
from upcycle.moe.init import init_router
from upcycle.moe.model import attach_moe, decoder_layers
from upcycle.seeding import generator

LORA_OTHER_RE = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])(?:\.default)?\.weight$")


def _average_non_expert(model, checkpoints: list[Path], mode: Literal["average", "last"]) -> None:
    """Set every non-MLP tensor of `model` to the mean (or last) of the checkpoints' values."""
    readers = [SafetensorsReader(sorted(p.glob("*.safetensors"))) for p in checkpoints]
    if mode == "last":
        readers = readers[-1:]
    state = model.state_dict()
    with torch.no_grad():
        for name, value in state.items():
            if ".mlp." in name or name not in readers[0].tensors:
                continue
            mean = sum(r.get(name).float() for r in readers) / len(readers)
            value.copy_(mean.to(value.dtype))


def _merge_lora_non_expert(model, adapters: list[LoRAExpert], mode: Literal["average", "last"]) -> list[str]:
    """Average the LoRA deltas on non-MLP modules (e.g. attention) of the adapters and add them to the base."""
    if mode == "last":
        adapters = adapters[-1:]
    deltas: dict[str, torch.Tensor] = {}
    for ad in adapters:
        pairs: dict[str, dict[str, str]] = {}
        for name in ad.reader.names():
            m = LORA_OTHER_RE.match(name)
            if m and ".mlp." not in m.group(1):
                pairs.setdefault(m.group(1), {})[m.group(2)] = name
        for module, ab in pairs.items():
            d = ad.scaling * (ad.reader.get(ab["B"]).float() @ ad.reader.get(ab["A"]).float())
            deltas[module] = deltas.get(module, 0) + d / len(adapters)
    state = model.state_dict()
    with torch.no_grad():
        for module, d in deltas.items():
            key = f"{module}.weight"
            if key not in state:
                raise UpcycleError(f"LoRA adapter targets {module}, which the base model does not have")
            state[key].add_(d.to(state[key].dtype))
    return sorted(deltas)


def assemble_moe(base: Path, expert_paths: list[Path], spec: MoESpec, shared_from: list[Path],
                 shared_mode: Literal["average", "last"] = "average", routers: Path | None = None,
                 seed: int = 0, dtype: torch.dtype = torch.float32):
    """The MoE model (stock dense class + MoE blocks) for a pool of stage-2 experts."""
    from transformers import AutoModelForCausalLM

    experts = [open_expert(p) for p in expert_paths]
    kind = experts[0].kind
    if spec.num_experts != len(experts):
        raise UpcycleError(f"moe.num_experts={spec.num_experts} but the expert pool has {len(experts)} experts")
    if (kind == "lora") != (spec.expert_type == "lora"):
        raise UpcycleError(f"the pool holds {kind} experts but moe.expert_type={spec.expert_type}: "
                           "LoRA experts go into a LoRA MoE, FFN experts into an MLP MoE")
    if spec.granularity != 1:
        raise UpcycleError("moe.granularity: UpIT experts are whole MLPs (granularity 1)")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, use_safetensors=True)
    if kind == "ffn":
        _average_non_expert(model, shared_from, shared_mode)
    else:
        _merge_lora_non_expert(model, [open_expert(p) for p in shared_from], shared_mode)
        rank = max(e.rank for e in experts)
        targets = sorted({k[1] for k in experts[0].keys}, key=["gate_proj", "up_proj", "down_proj"].index)
        spec = spec.model_copy(update={"lora": spec.lora.model_copy(update={"rank": rank, "alpha": float(rank), "targets": targets})})
    layers = decoder_layers(model)
    config = model.config
    layer_ids = sorted({k[0] for k in experts[0].keys})
    router_state = SafetensorsReader([routers]) if routers is not None else None
    for l in layer_ids:
        block = MoEBlock(spec, config.hidden_size, config.intermediate_size, config.hidden_act).to(dtype)
        dense = layers[l].mlp
        with torch.no_grad():
            if kind == "ffn":
                for e, ex in enumerate(experts):
                    for proj in ("gate_proj", "up_proj", "down_proj"):
                        getattr(block.experts, proj)[e].copy_(ex.weight((l, proj)))
            else:
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    getattr(block.experts, proj).copy_(getattr(dense, proj).weight)
                for proj in block.experts.targets:
                    for e, ex in enumerate(experts):
                        a, b = ex.factors((l, proj))
                        r = a.shape[0]
                        block.experts.lora_A[proj][e].zero_()
                        block.experts.lora_B[proj][e].zero_()
                        block.experts.lora_A[proj][e, :r].copy_(a)
                        block.experts.lora_B[proj][e, :, :r].copy_(ex.scaling * b)
            if router_state is not None:
                name = f"model.layers.{l}.mlp.router.weight"
                if name not in router_state:
                    raise UpcycleError(f"{routers}: no router for layer {l}")
                block.router.weight.copy_(router_state.get(name))
            else:
                block.router.weight.copy_(init_router(spec.num_experts, config.hidden_size, 1, spec.router_init_std,
                                                      generator(seed, "layer", l, "router")))
        layers[l].mlp = block
    spec = spec.model_copy(update={"layers": layer_ids if len(layer_ids) != len(layers) else None})
    attach_moe(model, spec)
    return model


def router_state_dict(model) -> dict[str, torch.Tensor]:
    """The routers of an MoE model, under their model state_dict names."""
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if k.endswith(".mlp.router.weight")}
