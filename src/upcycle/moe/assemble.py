"""Assemble UpIT's MoE from the stage outputs: experts (stage 2), routers (stage 3), and the
weights outside the experts (stage 1).

    FFN experts   expert e of layer l = expert e's MLP at layer l; attention, norms and embeddings
                  are the average of the stage-1 checkpoints in the pool (default, as
                  Branch-Train-MiX does) or the last of them.
    LoRA experts  the frozen dense MLP plus expert e's LoRA factors, brought to one common rank
                  (zero-padded, exact) at the experts' common alpha/r (experts/common_scaling:
                  folded into B only where they differ); LoRA deltas outside
                  the MLP (attention, if stage 1 trained them) are averaged and merged into the base.
Routers come from the route stage's file, or are drawn fresh (seeded) when router init is off.
`pool_from_expand` reads the expand stage's pool and `build_pool_model` assembles it: route and
post_train both build their MoE that way.

Memory: the model is built with its parameters on the meta device (no storage; buffers such as
RoPE frequencies are made as usual), then each parameter is allocated in the requested dtype on
the requested device and filled from the safetensors files one source tensor at a time. The peak
is one copy of the MoE in its dtype (on `device`) plus one source tensor (and its fp32 copy while
averaging or merging) in CPU RAM: an 8B FFN MoE assembled in bf16 straight onto a GPU never sits in
host memory, and no rank ever holds an fp32 copy it did not ask for.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from upcycle.config import MoESpec
from upcycle.errors import UpcycleError
from upcycle.experts import LoRAExpert, common_scaling, open_expert
from upcycle.io.safetensors_io import SafetensorsReader, release_memory
from upcycle.manifest import ExpandManifest, MixManifest, read_manifest, resolve_path
from upcycle.moe.block import MoEBlock
from upcycle.moe.init import init_router
from upcycle.moe.model import attach_moe, decoder_layers
from upcycle.seeding import generator

LORA_OTHER_RE = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])(?:\.default)?\.weight$")


def _lora_pairs(adapter: LoRAExpert) -> dict[str, tuple[str, str]]:
    """{module: (A name, B name)} of an adapter's LoRA factors outside the MLPs (e.g. attention)."""
    pairs: dict[str, dict[str, str]] = {}
    for name in adapter.reader.names():
        m = LORA_OTHER_RE.match(name)
        if m and ".mlp." not in m.group(1):
            pairs.setdefault(m.group(1), {})[m.group(2)] = name
    return {module: (ab["A"], ab["B"]) for module, ab in pairs.items()}


def _skeleton(base: Path, dtype: torch.dtype):
    """The dense model of `base` with its parameters on the meta device and its buffers real, set
    up as from_pretrained would (config, generation config, eval mode)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base), dtype=dtype)
    if (base / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(base)
    return model.eval()


def _materialize(model, name: str, fill, device: torch.device) -> None:
    """Give meta parameter `name` real storage (its dtype, on `device`) and let `fill(tensor)` write it."""
    module_name, _, local = name.rpartition(".")
    module = model.get_submodule(module_name)
    meta = module._parameters[local]
    value = torch.empty(meta.shape, dtype=meta.dtype, device=device)
    with torch.no_grad():
        fill(value)
    module._parameters[local] = nn.Parameter(value, requires_grad=meta.requires_grad)


def assemble_moe(base: Path, expert_paths: list[Path], spec: MoESpec, shared_from: list[Path],
                 shared_mode: Literal["average", "last"] = "average", routers: Path | None = None,
                 seed: int = 0, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
    """The MoE model (stock dense class + MoE blocks) for a pool of stage-2 experts, its weights in
    `dtype` on `device` (see the module docstring for the memory this takes)."""
    from accelerate import init_empty_weights

    base, device = Path(base), torch.device(device)
    experts = [open_expert(p) for p in expert_paths]
    kind = experts[0].kind
    if spec.num_experts != len(experts):
        raise UpcycleError(f"moe.num_experts={spec.num_experts} but the expert pool has {len(experts)} experts")
    if (kind == "lora") != (spec.expert_type == "lora"):
        raise UpcycleError(f"the pool holds {kind} experts but moe.expert_type={spec.expert_type}: "
                           "LoRA experts go into a LoRA MoE, FFN experts into an MLP MoE")
    if spec.granularity != 1:
        raise UpcycleError("moe.granularity: UpIT experts are whole MLPs (granularity 1)")
    if spec.num_shared_experts:
        raise UpcycleError(f"moe.num_shared_experts={spec.num_shared_experts}: an UpIT pool has no shared expert "
                           "to fill one from; set it to 0")
    base_weights = SafetensorsReader(sorted(base.glob("*.safetensors")))
    if not base_weights.tensors:
        raise UpcycleError(f"base {base}: no safetensors weights")
    model = _skeleton(base, dtype)
    config = model.config
    shared = shared_from[-1:] if shared_mode == "last" else shared_from
    if kind == "ffn":
        shared_readers = [SafetensorsReader(sorted(Path(p).glob("*.safetensors"))) for p in shared]
        adapters, lora_modules = [], {}
    else:
        shared_readers = []
        adapters = [open_expert(p) for p in shared]
        pairs = [_lora_pairs(ad) for ad in adapters]
        lora_modules = {m: [(ad, p[m]) for ad, p in zip(adapters, pairs) if m in p] for m in sorted(set().union(*pairs))}
        params = dict(model.named_parameters())
        for module in lora_modules:
            if f"{module}.weight" not in params:
                raise UpcycleError(f"LoRA adapter targets {module}, which the base model does not have")
        rank, scale = max(e.rank for e in experts), common_scaling(experts)
        targets = sorted({k[1] for k in experts[0].keys}, key=["gate_proj", "up_proj", "down_proj"].index)
        spec = spec.model_copy(update={"lora": spec.lora.model_copy(update={"rank": rank, "alpha": scale * rank,
                                                                            "targets": targets})})

    def dense_value(name: str):
        """How to fill a parameter outside the MoE blocks: the base's, the checkpoints' average, or base + LoRA delta."""
        if shared_readers and ".mlp." not in name and name in shared_readers[0]:
            def average(t):  # in place, from 0.0, in checkpoint order: two fp32 tensors at a time, same bits
                acc = torch.zeros(t.shape, dtype=torch.float32)
                for r in shared_readers:
                    acc.add_(r.get(name).float())
                t.copy_(acc.div_(len(shared_readers)))
            return average
        if name not in base_weights:
            raise UpcycleError(f"base {base}: no tensor {name!r} in its safetensors files; "
                               "is it a complete checkpoint of the model its config.json names?")
        module = name.removesuffix(".weight")

        def fill(t):
            t.copy_(base_weights.get(name))
            if name.endswith(".weight") and module in lora_modules:
                delta = torch.zeros(t.shape, dtype=torch.float32)  # the adapters' mean delta, summed in place
                for ad, (a, b) in lora_modules[module]:
                    delta.add_((ad.reader.get(b).float() @ ad.reader.get(a).float()).mul_(ad.scaling).div_(len(adapters)))
                t.add_(delta.to(t.dtype))
        return fill

    layers = decoder_layers(model)
    layer_ids = sorted({k[0] for k in experts[0].keys})
    blocks: dict[str, int] = {}  # parameter name prefix -> layer
    with init_empty_weights(include_buffers=False):
        for l in layer_ids:
            # built after model.eval(), so in training mode, as the blocks have always been
            layers[l].mlp = MoEBlock(spec, config.hidden_size, config.intermediate_size, config.hidden_act).to(dtype)
            blocks[f"model.layers.{l}.mlp."] = l
    router_state = SafetensorsReader([routers]) if routers is not None else None

    def block_value(l: int, local: str):
        """How to fill parameter `local` of layer l's MoE block, one expert's tensor at a time."""
        if local == "router.weight":
            if router_state is None:
                return lambda t: t.copy_(init_router(spec.num_experts, config.hidden_size, 1, spec.router_init_std,
                                                     generator(seed, "layer", l, "router")))
            name = f"model.layers.{l}.mlp.router.weight"
            if name not in router_state:
                raise UpcycleError(f"{routers}: no router for layer {l}")
            return lambda t: t.copy_(router_state.get(name))
        path = local.split(".")  # experts.PROJ (a bank) or experts.lora_A.PROJ / experts.lora_B.PROJ
        part, proj = path[1] if len(path) == 3 else None, path[-1]
        if kind == "ffn":
            def fill_experts(t):
                for e, ex in enumerate(experts):
                    t[e].copy_(ex.weight((l, proj)))
            return fill_experts
        if not part:  # the frozen dense projection every LoRA expert shares
            return lambda t: t.copy_(base_weights.get(f"model.layers.{l}.mlp.{proj}.weight"))

        def fill_lora(t):
            t.zero_()
            for e, ex in enumerate(experts):
                a, b = ex.factors((l, proj))
                r = a.shape[0]
                if part == "lora_A":
                    t[e, :r].copy_(a)
                else:
                    t[e, :, :r].copy_((ex.scaling / scale) * b)
        return fill_lora

    tied = model.all_tied_weights_keys  # {target: source}, e.g. lm_head.weight -> model.embed_tokens.weight
    untied = set()
    for name, _ in list(model.named_parameters(remove_duplicate=False)):  # a tied weight under each name
        prefix = next((p for p in blocks if name.startswith(p)), None)
        if prefix is not None:
            fill = block_value(blocks[prefix], name.removeprefix(prefix))
        elif name in tied and name not in base_weights:
            untied.add(name)  # tied to its source below, as from_pretrained does
            continue
        else:
            fill = dense_value(name)
        _materialize(model, name, fill, device)
    model.tie_weights(missing_keys=untied, recompute_mapping=False)
    model.to(device)  # the buffers
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise UpcycleError(f"base {base}: no weights for {', '.join(left[:3])}; is it a complete checkpoint?")
    release_memory()
    spec = spec.model_copy(update={"layers": layer_ids if len(layer_ids) != len(layers) else None})
    attach_moe(model, spec)
    return model


def router_state_dict(model) -> dict[str, torch.Tensor]:
    """The routers of an MoE model, under their model state_dict names."""
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if k.endswith(".mlp.router.weight")}


# ------------------------------------------------------------------------------ the expand stage's pool


def pool_from_expand(expand_dir: Path) -> ExpandManifest | MixManifest:
    """The finished expand (or mix) stage's manifest (base, kind, experts): the pool `build_pool_model`
    assembles, its paths resolved against the folder (a manifest stores them relative to it:
    upcycle/manifest.py)."""
    m = read_manifest(expand_dir, ("expand", "mix"))
    experts = [e.model_copy(update={"path": str(resolve_path(e.path, expand_dir))}) for e in m.experts]
    return m.model_copy(update={"base": str(resolve_path(m.base, expand_dir)), "experts": experts})


def build_pool_model(pool: ExpandManifest | MixManifest, spec, shared_weights: str, seed: int, routers: Path | None = None,
                     dtype: torch.dtype = torch.float32):
    """`assemble_moe` on an expand pool: one expert per pool entry, the weights outside the experts
    from its stage-1 checkpoints (`shared_weights`), routers from `routers` or drawn with `seed`."""
    paths = [Path(e.path) for e in pool.experts]
    shared = [Path(e.path) for e in pool.experts if e.origin == "checkpoint"]
    spec = spec.model_copy(update={"num_experts": len(paths), "expert_type": "lora" if pool.kind == "lora" else "mlp"})
    return assemble_moe(Path(pool.base), paths, spec, shared, shared_weights, routers=routers, seed=seed, dtype=dtype)
