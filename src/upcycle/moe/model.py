"""Turn a loaded dense transformers model into an MoE model in place, and read its MoE state back.

The result is still the stock class (e.g. LlamaForCausalLM) with each chosen layer's `mlp`
replaced by an `MoEBlock`, so `generate()`, the HF Trainer, peft and accelerate work unchanged.
A forward hook adds the auxiliary losses to `outputs.loss` in training mode when labels are
given (as the stock MoE classes do) and puts `aux_loss` and `router_logits` on the output.
Save with `upcycle.save_moe`, not `save_pretrained` (which would write a dense config).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from upcycle.architectures import dense_architecture
from upcycle.config import InitSpec, MoESpec
from upcycle.dense_config import unknown_key_problems
from upcycle.errors import UpcycleError
from upcycle.moe.block import MoEBlock, dense_mlp_weights
from upcycle.moe.layer import UpcycledLayer
from upcycle.moe.losses import load_balancing_loss, router_z_loss


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UpcycleError(f"{type(model).__name__}: expected decoder layers at model.model.layers")
    return layers


def moe_layer_indices(spec: MoESpec, num_layers: int) -> list[int]:
    layers = list(range(num_layers)) if spec.layers is None else sorted(spec.layers)
    bad = [l for l in layers if not 0 <= l < num_layers]
    if bad:
        raise UpcycleError(f"moe.layers: {bad} out of range; the model has layers 0..{num_layers - 1}")
    return layers


def moe_blocks(model: nn.Module) -> Iterator[tuple[int, MoEBlock]]:
    """(layer index, block) for every MoE layer, in order."""
    for i, layer in enumerate(decoder_layers(model)):
        if isinstance(layer.mlp, MoEBlock):
            yield i, layer.mlp


def check_supported(config) -> None:
    arch = dense_architecture(getattr(config, "model_type", None))
    if arch is None:
        from upcycle.architectures import DENSE_ARCHITECTURES
        raise UpcycleError(f"model_type {getattr(config, 'model_type', None)!r} is not supported; "
                           f"upcycle takes {', '.join(DENSE_ARCHITECTURES)} dense models")
    for key, want in arch.requires.items():
        if getattr(config, key, want) != want:
            raise UpcycleError(f"{config.model_type} with {key}={getattr(config, key)!r} is not supported (needs {want!r})")
    problems = unknown_key_problems(config.to_dict(), f"{type(config).__name__}")
    if problems:
        raise UpcycleError(*problems)


def upcycle_model(model: nn.Module, spec: MoESpec, init: InitSpec | None = None, seed: int = 0) -> nn.Module:
    """Replace the MLPs of `model` (in place) by MoE blocks initialized from them; returns `model`."""
    from upcycle.config import moe_spec_problems

    init = init or InitSpec()
    problems = moe_spec_problems(spec, init)
    if problems:
        raise UpcycleError(*problems)
    config = model.config
    check_supported(config)
    if config.intermediate_size % spec.granularity:
        raise UpcycleError(f"moe.granularity: {spec.granularity} does not divide intermediate_size={config.intermediate_size}")
    layers = decoder_layers(model)
    for i in moe_layer_indices(spec, len(layers)):
        dense = dense_mlp_weights(layers[i].mlp)
        ref = dense.gate
        block = MoEBlock(spec, config.hidden_size, config.intermediate_size, config.hidden_act)
        block.to(device=ref.device, dtype=ref.dtype)
        block.fill_from(UpcycledLayer(dense, i, spec, init, seed))
        layers[i].mlp = block
    attach_moe(model, spec)
    return model


def attach_moe(model: nn.Module, spec: MoESpec) -> None:
    """Record the spec on the model and install the loss hook (once)."""
    model.upcycle_spec = spec
    if not getattr(model, "_upcycle_hook", None):
        model._upcycle_hook = model.register_forward_hook(_add_moe_losses, with_kwargs=True)


@contextlib.contextmanager
def force_experts(model: nn.Module, expert_per_row: torch.Tensor):
    """Within the block: every token of batch row b goes to expert expert_per_row[b] alone (weight 1),
    in every MoE layer. The model then *is* the dense model with that expert's MLP, row by row."""
    blocks = [b for _, b in moe_blocks(model)]
    for b in blocks:
        b.forced_experts = expert_per_row
    try:
        yield model
    finally:
        for b in blocks:
            b.forced_experts = None


def router_logits(model: nn.Module) -> list[torch.Tensor]:
    """The router logits (T, N) of the last forward pass, one per MoE layer."""
    return [b.last_router_logits for _, b in moe_blocks(model) if b.last_router_logits is not None]


def moe_aux_losses(model: nn.Module, attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """{'aux_loss', 'z_loss'} of the last forward pass, before their coefficients."""
    spec: MoESpec = model.upcycle_spec
    logits = router_logits(model)
    return {
        "aux_loss": load_balancing_loss(logits, spec.top_k, spec.aux_loss_scope, attention_mask),
        "z_loss": router_z_loss(logits, attention_mask),
    }


def _add_moe_losses(module, args, kwargs, output):
    if not hasattr(output, "logits"):
        return output
    mask = kwargs.get("attention_mask")
    logits = router_logits(module)
    if not logits:
        return output
    if mask is not None and (mask.dim() != 2 or mask.numel() != logits[0].shape[0]):
        mask = None  # generation with a cache: the mask covers past tokens too
    losses = moe_aux_losses(module, mask)
    loss = getattr(output, "loss", None)
    if module.training and loss is not None:
        spec = module.upcycle_spec
        _check_router_gradient(module, logits, spec)
        loss = loss + spec.aux_loss_coef * losses["aux_loss"] + spec.z_loss_coef * losses["z_loss"]
    # The stock MoE output type (as Mixtral returns), so DDP and other output-rebuilding wrappers work.
    fields = {k: v for k, v in output.items() if k in ("logits", "cache", "hidden_states", "attentions")}
    return MoeCausalLMOutputWithPast(loss=loss, aux_loss=losses["aux_loss"], router_logits=tuple(logits), **fields)


def _check_router_gradient(model: nn.Module, logits: list[torch.Tensor], spec: MoESpec) -> None:
    """Refuse router losses that cannot train the routers they are meant for.

    Under activation checkpointing the block's forward may run under no_grad (torch's reentrant
    variant): its router logits then carry no graph, and the aux/z losses would be added to the
    loss while silently giving the routers no gradient. The non-reentrant variant (what
    train/engine.py asks for, and the Trainer's default) keeps the graph, and a recomputation in
    backward only overwrites `last_router_logits` after the loss is built, so nothing counts twice.
    """
    if not torch.is_grad_enabled() or not (spec.aux_loss_coef or spec.z_loss_coef):
        return
    trained = any(b.router.weight.requires_grad for _, b in moe_blocks(model))
    if trained and not any(l.requires_grad for l in logits):
        raise UpcycleError("router losses have no gradient: the MoE layers ran without autograd (reentrant "
                           "activation checkpointing?); use activation_checkpointing_kwargs={'use_reentrant': False}")
