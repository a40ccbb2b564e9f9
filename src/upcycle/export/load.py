"""Load an MoE folder into the toolkit's in-memory model (stock dense class + MoE blocks).

Reads the own format (full, or compact LoRA adapters loaded back onto their dense base) and the
native formats (Mixtral, Qwen2-MoE, Qwen3-MoE), so any of them can be analysed or trained further
with upcycle's losses. Every tensor in the files must land in the model and every model tensor
must come from the files: nothing is dropped or left at random init silently.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.initialization import no_init_weights

from upcycle.architectures import COMMON_CONFIG_KEYS, FORMAT_BY_MODEL_TYPE, MoEFormat
from upcycle.config import MoESpec
from upcycle.dense_config import config_object, facts_mismatch
from upcycle.errors import UpcycleError
from upcycle.export.save import OWN_META
from upcycle.io.model_folder import ModelFolder
from upcycle.io.safetensors_io import SafetensorsReader
from upcycle.moe.block import MoEBlock
from upcycle.moe.layer import LayerDims
from upcycle.moe.model import attach_moe, decoder_layers


def build_skeleton(dense_cfg: dict, spec: MoESpec, moe_layers: list[int], dtype: torch.dtype | None = None):
    """The dense stock model with empty MoE blocks in `moe_layers`; weights are uninitialized."""
    values = {k: v for k, v in dense_cfg.items() if k not in ("architectures", "transformers_version")}
    model_type = values.pop("model_type")
    config = AutoConfig.for_model(model_type, **values)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or getattr(config, "dtype", None) or torch.float32)
    model.tie_weights()  # no_init_weights also skips the tying done at init
    layers = decoder_layers(model)
    ref = next(model.parameters())
    for l in moe_layers:
        block = MoEBlock(spec, config.hidden_size, config.intermediate_size, config.hidden_act)
        layers[l].mlp = block.to(device=ref.device, dtype=ref.dtype)
    attach_moe(model, spec)
    return model


def _fill(model, tensors: dict[str, torch.Tensor], where: Path) -> None:
    state = model.state_dict()
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    missing = [k for k in state if k not in tensors and not (tied and k == "lm_head.weight")]
    unexpected = [k for k in tensors if k not in state]
    if missing or unexpected:
        raise UpcycleError(f"{where}: tensors do not match the model "
                           f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                           f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''})")
    with torch.no_grad():
        for k, t in tensors.items():
            if tuple(state[k].shape) != tuple(t.shape):
                raise UpcycleError(f"{where}: tensor {k} has shape {tuple(t.shape)}, the model expects {tuple(state[k].shape)}")
            state[k].copy_(t)


def load_moe(path: str | Path, base: str | Path | None = None, dtype: torch.dtype | None = None):
    """Load an MoE folder (own or native format) as an in-memory upcycle model."""
    path = Path(path)
    if (path / OWN_META).is_file():
        return _load_own(path, base, dtype)
    folder = ModelFolder(path, what="model")
    fmt = FORMAT_BY_MODEL_TYPE.get(folder.model_type)
    if fmt is None:
        raise UpcycleError(f"model {path}: model_type {folder.model_type!r} is not an MoE format upcycle reads "
                           f"({', '.join(FORMAT_BY_MODEL_TYPE)} or the upcycle format)")
    return _load_native(folder, fmt, dtype)


def _load_own(path: Path, base: str | Path | None, dtype: torch.dtype | None):
    meta = json.loads((path / OWN_META).read_text())
    spec = MoESpec.model_validate(meta["spec"])
    model = build_skeleton(meta["base_config"], spec, meta["moe_layers"], dtype)
    source = SafetensorsReader(sorted(path.glob("*.safetensors")))
    loaded = {n: source.get(n) for n in source.names()}
    if meta.get("compact"):
        base_path = Path(base) if base is not None else Path(meta["base"]["path"])
        folder = ModelFolder(base_path)
        if folder.fingerprint() != meta["base"]["fingerprint"]:
            raise UpcycleError(f"base {base_path}: not the dense model these adapters were made on "
                               f"(fingerprint {folder.fingerprint()} != {meta['base']['fingerprint']}); pass the right base=")
        dense = folder.reader()
        moe_prefixes = tuple(f"model.layers.{l}.mlp." for l in meta["moe_layers"])
        for name in dense.names():
            if name.startswith(moe_prefixes):
                proj = name.rsplit(".", 2)[-2]  # model.layers.L.mlp.<proj>.weight -> LoRA base weight
                loaded[name.rsplit(".", 2)[0] + f".experts.{proj}"] = dense.get(name)
            else:
                loaded[name] = dense.get(name)
    _fill(model, loaded, path)
    return model


def native_to_dense(fmt: MoEFormat, config) -> tuple[dict, MoESpec, list[int]]:
    """A native MoE config -> (the dense config whose attention and norms match, MoE spec, MoE layers)."""
    cfg = config.to_dict()
    cfg["num_experts"] = config.num_experts  # attribute maps differ: Mixtral/Qwen3 store num_local_experts
    dense = {k: cfg[k] for k in COMMON_CONFIG_KEYS if k in cfg}
    n_layers = cfg["num_hidden_layers"]
    if fmt.name == "mixtral":
        expert_width = intermediate = cfg["intermediate_size"]
        dense.update(model_type="mistral", sliding_window=cfg.get("sliding_window"))
        spec_kw = dict(num_experts=cfg["num_experts"], routing="topk_softmax")
        moe_layers = list(range(n_layers))
    else:
        intermediate, expert_width = cfg["intermediate_size"], cfg["moe_intermediate_size"]
        sparse_step, dense_only = cfg.get("decoder_sparse_step", 1) or 1, set(cfg.get("mlp_only_layers") or [])
        moe_layers = [l for l in range(n_layers) if l not in dense_only and (l + 1) % sparse_step == 0]
        spec_kw = dict(num_experts=cfg["num_experts"], routing="softmax_topk_renorm" if cfg.get("norm_topk_prob") else "softmax_topk")
        if fmt.name == "qwen2_moe":
            shared = cfg.get("shared_expert_intermediate_size") or 0
            if shared % expert_width:
                raise UpcycleError(f"qwen2_moe shared_expert_intermediate_size={shared} is not a multiple of "
                                   f"moe_intermediate_size={expert_width}; upcycle cannot represent it")
            spec_kw.update(num_shared_experts=shared // expert_width, shared_expert_gate=bool(shared))
            windows = {cfg["sliding_window"] for t in cfg.get("layer_types") or [] if t == "sliding_attention"}
            if cfg.get("qkv_bias", True):
                dense.update(model_type="qwen2", **{k: cfg[k] for k in ("use_sliding_window", "sliding_window",
                                                                        "max_window_layers", "layer_types") if k in cfg})
            elif windows:  # made from a Mistral with a window: every layer slides
                dense.update(model_type="mistral", sliding_window=max(windows))
            else:
                dense.update(model_type="llama", attention_bias=False)
        else:
            dense.update(model_type="qwen3", attention_bias=cfg.get("attention_bias", False))
    if intermediate % expert_width:
        raise UpcycleError(f"{fmt.name}: intermediate_size={intermediate} is not a multiple of the expert width "
                           f"{expert_width}; upcycle cannot represent it")
    dense["intermediate_size"] = intermediate
    mismatch = facts_mismatch(config_object(dense), config)
    if mismatch:
        raise UpcycleError(f"{fmt.name}: no dense model upcycle knows has this attention ({mismatch}); "
                           "upcycle cannot load it")
    spec = MoESpec(top_k=cfg["num_experts_per_tok"], granularity=intermediate // expert_width,
                   aux_loss_coef=cfg.get("router_aux_loss_coef", 0.01), **spec_kw)
    return dense, spec, moe_layers


def _load_native(folder: ModelFolder, fmt: MoEFormat, dtype: torch.dtype | None):
    dense_cfg, spec, moe_layers = native_to_dense(fmt, AutoConfig.from_pretrained(folder.path))
    model = build_skeleton(dense_cfg, spec, moe_layers, dtype)
    reader = folder.reader()
    dims = LayerDims(dense_cfg["hidden_size"], dense_cfg["intermediate_size"], spec)
    role_of: dict[str, tuple[int, tuple]] = {}
    for l in moe_layers:
        for name, role in fmt.layer_entries(l, spec, dims.shared_width):
            role_of[name] = (l, role)
    layers = decoder_layers(model)
    plain: dict[str, torch.Tensor] = {}
    moe_state = {k for k in model.state_dict() if any(k.startswith(f"model.layers.{l}.mlp.") for l in moe_layers)}
    filled: set[tuple] = set()
    for name in reader.names():
        if name in role_of:
            l, role = role_of[name]
            _set_role(layers[l].mlp, role, reader.get(name), name)
            filled.add((l, role))
        else:
            plain[name] = reader.get(name)
    expected = {(l, r) for l in moe_layers for _, r in fmt.layer_entries(l, spec, dims.shared_width)}
    if expected - filled:
        l, role = sorted(expected - filled)[0]
        raise UpcycleError(f"{folder.path}: MoE tensor for layer {l} {role} is missing")
    # MoE tensors are in place; check and fill the rest.
    state = model.state_dict()
    for k in moe_state:
        plain.setdefault(k, state[k])
    _fill(model, plain, folder.path)
    return model


@torch.no_grad()
def _set_role(block: MoEBlock, role: tuple, tensor: torch.Tensor, name: str) -> None:
    kind = role[0]
    if kind == "router":
        block.router.weight.copy_(tensor)
    elif kind == "expert":
        getattr(block.experts, role[2])[role[1]].copy_(tensor)
    elif kind == "shared":
        if block.shared_experts is None:
            if tensor.numel():
                raise UpcycleError(f"{name}: a shared expert the MoE spec does not have")
            return
        getattr(block.shared_experts, role[1]).weight.copy_(tensor)
    elif kind == "shared_gate":
        if block.shared_expert_gate is not None:
            block.shared_expert_gate.weight.copy_(tensor)
    else:
        raise KeyError(role)
