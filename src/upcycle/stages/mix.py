"""`upcycle mix`: an MoE from a base and N experts trained apart from each other.

    upcycle mix --config mix.yaml        (base=..., experts=[ft_a, ft_b, ...], out=..., router_init=ppl)

The story: open the base and every expert (full fine-tunes of the base, or peft LoRA adapters of
it) and refuse any that is not of that base, naming the first difference (config, tensor names,
shapes, a weight fingerprint: sampled tensors must stay near the base's; for adapters, the base
they name and the module shapes). Layer l's MoE has expert e = expert e's MLP (or the base MLP
plus expert e's LoRA deltas, kept as factors); the other weights are the base's, the experts'
average (Branch-Train-MiX) or one expert's. Routers are initialized (`router_init`): `ppl` is UpIT
stage 3 on these experts (seed data -> per-expert perplexity buckets -> router pre-training),
`prompts` takes each expert's positive minus negative prompt mean of the mixed model's own router
input (the post-attention norm's output), layer by layer, `cheap_embed` the mean token
embedding of the prompts, `random` a seeded draw. The folder is then streamed tensor by tensor
(export/save.py's `write_moe_folder`), as `upcycle build` writes; only `ppl` and `prompts` hold
the MoE in memory (they run it).

Output folder: `model/` (the MoE, export.format), `manifest.json` (experts, their checks, the
routing report), `routers.safetensors`. The manifest also has the fields `upcycle post-train`
reads from an expand stage (`base`, `kind`, `experts`), so a recipe post-trains `moe/`.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from upcycle.config import MixConfig, MoESpec

from upcycle.config_io import config_hash, dump_config
from upcycle.errors import UpcycleError
from upcycle.export.save import MODEL_DIR
from upcycle.experts import FFN_RE, LoRAExpert, common_scaling, open_expert
from upcycle.io.model_folder import ModelFolder
from upcycle.io.user_files import read_json_object
from upcycle.manifest import Manifest, read_manifest, resolve_path, stored_path
from upcycle.moe.experts import PROJS
from upcycle.seeding import generator

MODEL = MODEL_DIR  # the MoE's folder, where post-train looks in a route-like folder (stages/post_train.py)
ROUTERS = "routers.safetensors"
# Base-config keys an expert of that base must share.
SHAPE_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "vocab_size", "hidden_act")
# Tensors compared for the fingerprint of a full fine-tune: how many, spread over the checkpoint.
FINGERPRINT_SAMPLES = 4


# ------------------------------------------------------------------------------ the experts and their checks


def expert_paths(cfg: MixConfig) -> list[str]:
    """The expert folders: given directly (folders or hub ids of fine-tunes and adapters), or the branch
    stage's per-domain experts in domain order."""
    from upcycle.models import resolve_model

    if cfg.branch is None:
        return [str(resolve_model(e, f"experts[{i}]")) for i, e in enumerate(cfg.experts)]
    return [str(resolve_path(d.expert, cfg.branch)) for d in read_manifest(cfg.branch, "branch").domains]


@dataclass
class Mixture:
    """The base, the opened experts and what the MoE is made of; every check done on construction."""

    base: ModelFolder
    experts: list  # FFNExpert | LoRAExpert, one kind
    kind: str  # "ffn" | "lora"
    layers: list[int]
    targets: list[str]  # LoRA: the projections carrying deltas
    rank: int  # LoRA: the common rank (smaller adapters zero-padded, exact)
    checks: list[dict]

    @property
    def scale(self) -> float:
        """LoRA: the MoE's alpha / r (experts.common_scaling)."""
        return common_scaling(self.experts) if self.kind == "lora" else 1.0

    @property
    def config(self) -> dict:
        return self.base.config


def open_mixture(base: str | Path, paths: list[str], check_base: bool = True, max_drift: float = 1.0,
                 allow_duplicates: bool = False) -> Mixture:
    from upcycle.models import resolve_model

    if not paths:
        raise UpcycleError("experts: none given; list the fine-tune or adapter folders (experts=[a, b])")
    base_folder = ModelFolder(resolve_model(str(base)))
    experts = []
    for i, p in enumerate(paths):
        if not Path(p).is_dir():
            raise UpcycleError(f"experts[{i}] {p}: not a folder")
        experts.append(open_expert(p))
    kinds = {e.kind for e in experts}
    if len(kinds) > 1:
        raise UpcycleError(f"experts: {[e.kind for e in experts]}: all experts must be full fine-tunes or all LoRA "
                           "adapters (a LoRA expert and an FFN expert cannot share one MoE layer)")
    kind = kinds.pop()
    check = _check_lora if kind == "lora" else _check_ffn
    checks = [check(base_folder, e, i, check_base, max_drift) for i, e in enumerate(experts)]
    for i, j in duplicate_experts(experts):
        message = (f"experts[{j}] {paths[j]}: the same expert as experts[{i}] {paths[i]} (identical weights); two "
                   "copies of one expert only split its tokens")
        if not allow_duplicates:
            raise UpcycleError(f"{message}; remove one, or pass --allow-duplicate-experts if this is intended")
        warnings.warn(message)
    first = set(experts[0].keys)
    for i, e in enumerate(experts[1:], 1):
        if set(e.keys) != first:
            diff = sorted(set(e.keys) ^ first)[0]
            where = f"experts[{i}]" if diff in set(e.keys) else "experts[0]"
            other = "experts[0]" if where != "experts[0]" else f"experts[{i}]"
            raise UpcycleError(f"experts[{i}] {e.path}: its MLP weights differ from experts[0]'s: {where} has "
                               f"layer {diff[0]} {diff[1]}, {other} does not; mix experts trained on the same modules")
    layers = sorted({k[0] for k in experts[0].keys})
    targets = [p for p in PROJS if any(k[1] == p for k in experts[0].keys)]
    if kind == "lora":
        missing = [(l, p) for l in layers for p in targets if (l, p) not in first]
        if missing:
            raise UpcycleError(f"experts[0] {experts[0].path}: adapters on {targets} in some layers only "
                               f"(none on layer {missing[0][0]} {missing[0][1]}); LoRA experts need the same "
                               "projections in every adapted layer")
    rank = max(e.rank for e in experts) if kind == "lora" else 0
    return Mixture(base_folder, experts, kind, layers, targets, rank, checks)


def duplicate_experts(experts: list) -> list[tuple[int, int]]:
    """Pairs (i, j), i < j, of experts with the same weights: the same folder, or byte-identical
    weight files. A cheap fingerprint (sizes, headers, sampled chunks) finds candidates; only
    those are hashed whole, so distinct multi-GB experts are never read twice."""
    from upcycle.io.model_folder import quick_fingerprint
    from upcycle.manifest import sha256_files

    files = [expert.weight_files() for expert in experts]
    quick = [quick_fingerprint(f) for f in files]
    pairs = []
    for j in range(len(experts)):
        for i in range(j):
            same_folder = experts[i].path.resolve() == experts[j].path.resolve()
            if same_folder or (quick[i] == quick[j] and sha256_files(files[i]) == sha256_files(files[j])):
                pairs.append((i, j))
                break
    return pairs


def _first_config_difference(base: dict, other: dict) -> str | None:
    for key in SHAPE_KEYS:
        if base.get(key) != other.get(key):
            return f"config.json {key}={other.get(key)!r}, the base has {base.get(key)!r}"
    return None


def _check_ffn(base: ModelFolder, expert, i: int, check_base: bool, max_drift: float) -> dict:
    """Same config shape, same tensor names and shapes as the base, and (fingerprint) sampled tensors
    within max_drift of the base's: a fine-tune moves its weights a little, another model entirely."""
    where = f"experts[{i}] {expert.path}"
    cfg_path = expert.path / "config.json"
    if cfg_path.is_file():
        diff = _first_config_difference(base.config, read_json_object(cfg_path, "model config (config.json)"))
        if diff:
            raise UpcycleError(f"{where}: not a fine-tune of the base: {diff}")
    base_reader = base.reader()
    tied = {"lm_head.weight"} if base.config.get("tie_word_embeddings") else set()  # saved or not, one tensor
    names, theirs = set(base_reader.names()) - tied, set(expert.reader.names()) - tied
    for name in sorted(names ^ theirs):
        has = "has" if name in theirs else "lacks"
        raise UpcycleError(f"{where}: {has} tensor {name}, the base {'does not' if has == 'has' else 'does'}; "
                           "an expert must have exactly the base's tensors")
    for name in sorted(names):
        a, b = tuple(base_reader.tensors[name].shape), tuple(expert.reader.tensors[name].shape)
        if a != b:
            raise UpcycleError(f"{where}: tensor {name} has shape {list(b)}, the base's is {list(a)}")
    drift = {}
    if check_base:
        ordered = sorted(names)
        step = max(1, len(ordered) // FINGERPRINT_SAMPLES)
        for name in ordered[::step][:FINGERPRINT_SAMPLES]:
            w0 = base_reader.get(name).float()
            d = ((expert.reader.get(name).float() - w0).norm() / w0.norm().clamp_min(1e-12)).item()
            drift[name] = d
            if not d <= max_drift:  # NaN counts as too far (the readers refuse non-finite weights first)
                raise UpcycleError(f"{where}: tensor {name} is {d:.3g} of the base's norm away from it (more than "
                                   f"max_drift={max_drift}): not a fine-tune of this base; pass the right base, or "
                                   "raise max_drift / set check_base=false if the fine-tune moved that far")
    return {"expert": str(expert.path), "kind": "ffn", "drift": drift}


def _check_lora(base: ModelFolder, expert: LoRAExpert, i: int, check_base: bool, max_drift: float) -> dict:
    """The adapter names this base (same folder, or a folder with the same fingerprint, or the same
    hub name) and its factors fit the base's module shapes."""
    where = f"experts[{i}] {expert.path}"
    named = expert.base_model
    if check_base and named:
        other = Path(named)
        if other.is_dir():
            same = other.resolve() == base.path.resolve() or (
                (other / "config.json").is_file() and ModelFolder(other).fingerprint() == base.fingerprint())
        else:
            same = named in (base.config.get("_name_or_path"), base.path.name) or named.endswith("/" + base.path.name)
        if not same:
            raise UpcycleError(f"{where}: an adapter of {named}, not of the base {base.path} (different weights); "
                               "pass that base, or set check_base=false if it is the same model saved elsewhere")
    reader = base.reader()
    for key in expert.keys:
        name = f"model.layers.{key[0]}.mlp.{key[1]}.weight"
        if name not in reader.tensors:
            raise UpcycleError(f"{where}: adapts layer {key[0]} {key[1]}, which the base does not have")
        want = tuple(reader.tensors[name].shape)
        if expert.shape(key) != want:
            raise UpcycleError(f"{where}: the adapter on layer {key[0]} {key[1]} makes a {list(expert.shape(key))} "
                               f"delta, the base's weight is {list(want)}: an adapter of another model")
    return {"expert": str(expert.path), "kind": "lora", "base_model": named, "rank": expert.rank}


# ------------------------------------------------------------------------------ tensors by role


class MixSource:
    """Serves `write_moe_folder` and the in-memory model: every tensor of the mixed MoE by its part
    (("tensor", name) outside the experts; ("moe", layer, *role) inside). Reads one tensor at a time."""

    def __init__(self, mix: Mixture, shared: str | int, routers: dict[int, torch.Tensor] | None = None):
        self.mix, self.shared, self.routers = mix, shared, routers or {}
        self.reader = mix.base.reader()
        self._deltas: dict[str, torch.Tensor] | None = None

    def dense(self, name: str) -> torch.Tensor:
        """A tensor outside the experts: the base's, the experts' mean, or one expert's."""
        base = self.reader.get(name)
        if self.mix.kind == "ffn":
            if self.shared == "base":
                return base
            if self.shared == "average":
                mean = sum(e.reader.get(name).float() for e in self.mix.experts) / len(self.mix.experts)
                return mean.to(base.dtype)
            return self.mix.experts[self.shared].reader.get(name)
        delta = self.lora_other_deltas().get(name)
        return base if delta is None else (base.float() + delta).to(base.dtype)

    def lora_other_deltas(self) -> dict[str, torch.Tensor]:
        """LoRA deltas outside the MLPs (e.g. attention), by weight name: averaged or one adapter's (small)."""
        if self._deltas is None:
            chosen = {"base": [], "average": self.mix.experts}.get(self.shared) if isinstance(self.shared, str) \
                else [self.mix.experts[self.shared]]
            self._deltas = {}
            for e in chosen:
                for name, d in e.other_deltas().items():
                    self._deltas[name] = self._deltas.get(name, 0) + d / len(chosen)
        return self._deltas

    def mlp(self, layer: int, proj: str) -> torch.Tensor:
        return self.reader.get(f"model.layers.{layer}.mlp.{proj}.weight")

    def role(self, layer: int, role: tuple) -> torch.Tensor:
        kind = role[0]
        m = self.mix
        if kind == "router":
            return self.routers[layer]
        if kind == "expert":
            e, proj = role[1], role[2]
            if m.kind == "ffn":
                return m.experts[e].reader.get(f"model.layers.{layer}.mlp.{proj}.weight")
            w = self.mlp(layer, proj)
            key = (layer, proj)
            return w if key not in m.experts[e].names else (w.float() + m.experts[e].tau(key)).to(w.dtype)
        if kind == "lora_base":
            return self.mlp(layer, role[1])
        if kind in ("lora_A", "lora_B"):
            proj = role[1]
            out = []
            for e in m.experts:
                a, b = e.factors((layer, proj))
                r = a.shape[0]
                if kind == "lora_A":  # (rank, in), zero rows past this adapter's rank
                    out.append(torch.cat([a, torch.zeros(m.rank - r, a.shape[1])]))
                else:  # (out, rank), each expert's alpha/r relative to the MoE's (experts.common_scaling)
                    out.append(torch.cat([(e.scaling / m.scale) * b, torch.zeros(b.shape[0], m.rank - r)], dim=1))
            return torch.stack(out)
        hidden = m.config["hidden_size"]
        if kind == "shared":  # a format that always has a shared expert (Qwen2-MoE): width 0
            return torch.zeros((hidden, 0) if role[1] == "down_proj" else (0, hidden))
        if kind == "shared_gate":
            return torch.zeros(1, hidden)
        raise KeyError(f"unknown tensor role {role}")

    def __call__(self, part: tuple) -> torch.Tensor:
        if part[0] == "tensor":
            return self.dense(part[1])
        return self.role(part[1], part[2:])


def mix_spec(mix: Mixture, moe: MoESpec) -> MoESpec:
    """The MoE's spec: experts and their type from the mixture, routing and losses from the config."""
    update = {"num_experts": len(mix.experts), "expert_type": "lora" if mix.kind == "lora" else "mlp",
              "layers": mix.layers if len(mix.layers) != mix.config["num_hidden_layers"] else None}
    if moe.top_k > len(mix.experts):
        raise UpcycleError(f"moe.top_k: {moe.top_k} is larger than the {len(mix.experts)} experts; "
                           f"choose top_k <= {len(mix.experts)}")
    if mix.kind == "lora":
        update["lora"] = moe.lora.model_copy(update={"rank": mix.rank, "alpha": mix.scale * mix.rank, "targets": mix.targets})
    return moe.model_copy(update=update)


def passthrough(mix: Mixture) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Tensors outside the MoE layers' MLPs, with the base's shapes and dtypes."""
    moe = set(mix.layers)
    tied = bool(mix.config.get("tie_word_embeddings"))
    out = {}
    for name, info in mix.base.reader().tensors.items():
        m = FFN_RE.match(name)
        if (m and int(m.group(1)) in moe) or (tied and name == "lm_head.weight") or name.endswith("rotary_emb.inv_freq"):
            continue
        out[name] = (tuple(info.shape), info.dtype)
    return out


def in_memory_model(mix: Mixture, source: MixSource, spec: MoESpec, dtype: torch.dtype = torch.float32):
    """The mixed MoE as a live model (stock dense class + MoE blocks), filled from `source`."""
    from upcycle.export.load import build_skeleton
    from upcycle.moe.model import moe_blocks

    model = build_skeleton(mix.config, spec, mix.layers, dtype)
    blocks = dict(moe_blocks(model))
    state = model.state_dict()
    with torch.no_grad():
        for name in passthrough(mix):
            state[name].copy_(source.dense(name))
        for l, block in blocks.items():
            block.fill_from(SimpleNamespace(get=lambda role, l=l: source.role(l, role)))
    model.tie_weights()
    return model


def random_routers(mix: Mixture, spec: MoESpec, seed: int) -> dict[int, torch.Tensor]:
    from upcycle.moe.init import init_router

    return {l: init_router(spec.num_experts, mix.config["hidden_size"], 1, spec.router_init_std,
                           generator(seed, "layer", l, "router")) for l in mix.layers}


# ------------------------------------------------------------------------------ router initialization


def _unit_rows(pos: list[torch.Tensor], neg: list[torch.Tensor]) -> torch.Tensor:
    """Per expert: positive mean minus negative mean (0 without negatives), normalized to unit length."""
    rows = [p - (n if n is not None else 0) for p, n in zip(pos, neg)]
    stacked = torch.stack(rows).float()
    return stacked / stacked.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _prompt_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    empty = [t for t, i in zip(texts, ids) if not i]
    if empty:
        raise UpcycleError(f"prompts: {empty[0]!r} has no tokens; give non-empty prompts")
    return ids


def cheap_embed_routers(mix: Mixture, cfg: MixConfig, tokenizer) -> dict[int, torch.Tensor]:
    """mergekit's cheap_embed: each expert's row is the mean input embedding of its positive prompts'
    tokens minus that of its negatives, normalized; the same rows in every layer."""
    table = mix.base.reader().get("model.embed_tokens.weight").float()

    def mean(texts: list[str]) -> torch.Tensor | None:
        if not texts:
            return None
        return torch.cat([table[torch.tensor(i)] for i in _prompt_ids(tokenizer, texts)]).mean(0)

    rows = _unit_rows([mean(p.positive) for p in cfg.prompts], [mean(p.negative) for p in cfg.prompts])
    return {l: rows.clone() for l in mix.layers}


@torch.no_grad()
def prompt_routers(model, cfg: MixConfig, tokenizer) -> dict[int, torch.Tensor]:
    """Each expert's row at layer l: the mean over its positive prompts' tokens of the MoE block's input
    (the post-attention norm's output, the router's true input) minus the negatives' mean, normalized.
    Layer by layer: layer l's inputs are computed with the routers of layers < l already set."""
    from upcycle.moe.model import moe_blocks

    model.eval()
    blocks = dict(moe_blocks(model))
    device = next(model.parameters()).device

    def block_input_mean(block, texts: list[str]) -> torch.Tensor | None:
        if not texts:
            return None
        seen = []
        hook = block.register_forward_pre_hook(lambda mod, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
        try:
            for ids in _prompt_ids(tokenizer, texts):
                model(input_ids=torch.tensor([ids], device=device))
        finally:
            hook.remove()
        return torch.cat(seen).float().mean(0).cpu()

    routers = {}
    for l in sorted(blocks):
        block = blocks[l]
        rows = _unit_rows([block_input_mean(block, p.positive) for p in cfg.prompts],
                          [block_input_mean(block, p.negative) for p in cfg.prompts])
        block.router.weight.copy_(rows.to(block.router.weight.dtype))
        routers[l] = rows
    return routers


def seed_samples(cfg: MixConfig, tokenizer) -> list:
    """router_init=ppl: the seed samples drawn from the given data (read before anything is written)."""
    from upcycle.data.build import build_datasets
    from upcycle.routing.buckets import seed_count, seed_indices

    p = cfg.ppl
    data = build_datasets(cfg.data.model_copy(update={"eval_fraction": 0.0, "packing": False}), tokenizer, cfg.seed)
    count = seed_count(len(data.train), p.seed_count, p.seed_fraction, len(expert_paths(cfg)), p.min_seed_per_expert)
    return [data.train.samples[i] for i in seed_indices(len(data.train), count, cfg.seed)]


def ppl_routers(model, cfg: MixConfig, samples: list, tokenizer, out: Path, progress: bool
                ) -> tuple[dict[int, torch.Tensor], dict]:
    """UpIT stage 3 on the mixed experts, with the route stage's own functions (upcycle/routing/,
    upcycle/train/trainer.py): the perplexity of each seed sample under every expert alone,
    buckets, then router pre-training (routers only)."""
    from upcycle.data.dataset import Collator, InstructionDataset
    from upcycle.devices import fp32_master_weights
    from upcycle.moe.model import moe_blocks
    from upcycle.routing.buckets import assign_buckets, fill_empty_buckets
    from upcycle.routing.loss import router_loss
    from upcycle.routing.scoring import owner_share, score_experts
    from upcycle.train.engine import training_arguments
    from upcycle.train.trainer import make_trainer_class, set_trainable

    p = cfg.ppl
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    domains = [s.meta.get("domain") for s in samples]
    n, k = model.upcycle_spec.num_experts, model.upcycle_spec.top_k
    ppl = score_experts(model, samples, n, p.score_batch_size, pad, progress)
    owners = assign_buckets(ppl, p.buckets, cfg.seed)
    owners, notes = fill_empty_buckets(owners, ppl, p.empty_bucket)
    report = {"seed_samples": len(samples), "ppl": ppl.tolist(), "owners": owners.tolist(), "domains": domains,
              "buckets": {str(e): {d: sum(1 for x, o in zip(domains, owners.tolist()) if o == e and x == d)
                                   for d in sorted({str(x) for x in domains})} for e in range(n)},
              "notes": notes, "share_before": owner_share(model, samples, owners, k, pad)}
    set_trainable(model, "routers")
    fp32_master_weights(model)
    dataset = InstructionDataset([{"input_ids": s.input_ids, "labels": s.labels, "owner": int(o)}
                                  for s, o in zip(samples, owners.tolist())])
    args = training_arguments(p.train, out / "checkpoints", cfg.seed, moe=True, progress=progress)
    trainer = make_trainer_class(p.train, lambda m, inputs: router_loss(m, inputs, p.alpha, p.aux_target, n))(
        model=model, args=args, train_dataset=dataset, data_collator=Collator(pad))
    if not progress:
        from transformers.trainer_callback import PrinterCallback
        trainer.remove_callback(PrinterCallback)
    aux, model.upcycle_spec = model.upcycle_spec, model.upcycle_spec.model_copy(
        update={"aux_loss_coef": 0.0, "z_loss_coef": 0.0})  # the route loss is its own
    trainer.train()
    model.upcycle_spec = aux
    report["share_after"] = owner_share(model, samples, owners, k, pad)
    return {l: b.router.weight.detach().float().cpu().clone() for l, b in moe_blocks(model)}, report


# ------------------------------------------------------------------------------ the stage


def card_info(cfg: MixConfig, mix: Mixture, method: str = "mix") -> dict:
    """What the card says. `method` (mix, btx, self-moe) is passed on once export/model_card.py's
    METHODS knows it; until then the card names it in its stages."""
    from upcycle.data.instructions import describe_source
    from upcycle.export.model_card import METHODS

    kind = "LoRA adapters" if mix.kind == "lora" else "full fine-tunes"
    shared = {"base": "the base's", "average": "the average over the experts"}.get(cfg.shared, f"expert {cfg.shared}'s") \
        if isinstance(cfg.shared, str) else f"expert {cfg.shared}'s"
    return {"tool": "upcycle mix", "base": str(mix.base.path), "method": method if method in METHODS else None,
            "data": [describe_source(d) for d in cfg.data.train] if cfg.router_init == "ppl" else None,
            "stages": [f"{method}: {len(mix.experts)} experts ({kind} of the base); weights outside the experts: {shared}",
                       f"router init: {cfg.router_init}"]}


def run(cfg: MixConfig, progress: bool = True, method: str = "mix") -> dict:
    """Under torchrun rank 0 checks the inputs and writes the folder; every rank computes the routers
    (ppl: sharded scoring and the Trainer's router training; the other inits are cheap and seeded,
    the same on every rank) (upcycle/distributed.py)."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from upcycle import distributed as dist
    from upcycle.models import resolve_model
    from upcycle.export.save import resolve_format, write_moe_folder
    from upcycle.io.atomic import atomic_write_file, claim_output

    started = time.perf_counter()
    if cfg.base is None or cfg.out is None:
        raise UpcycleError("mix: base= and out= are required")
    dist.init()
    out = Path(cfg.out)

    def inputs():  # every input checked, the seed data read, before anything is written
        paths = expert_paths(cfg)
        reads = [resolve_model(cfg.base), *paths, cfg.branch, *cfg.data.local_files()]
        claim_output(out, reads, cfg.force, resumable=True)
        mix = open_mixture(cfg.base, paths, cfg.check_base, cfg.max_drift, cfg.allow_duplicate_experts)
        spec = mix_spec(mix, cfg.moe)
        if cfg.prompts is not None and cfg.router_init in ("prompts", "cheap_embed") and len(cfg.prompts) != len(paths):
            raise UpcycleError(f"prompts: {len(cfg.prompts)} entries for {len(paths)} experts; give one per expert")
        target = resolve_format(cfg.export.format, mix.config, spec, cfg.export.lora_storage)
        tokenizer = AutoTokenizer.from_pretrained(mix.base.path)
        samples = seed_samples(cfg, tokenizer) if cfg.router_init == "ppl" else []
        return paths, reads, mix, spec, target, tokenizer, samples

    paths, reads, mix, spec, target, tokenizer, samples = dist.rank_zero_first(inputs)
    manifest = dist.on_rank_zero_then_wait(lambda: Manifest.open(
        out, "mix", config_hash(cfg), force=cfg.force, inputs=reads, initial={
            "base": stored_path(mix.base.path, out), "kind": mix.kind,
            "experts": [{"path": stored_path(p, out), "origin": "checkpoint"} for p in paths]}))
    if manifest.complete:
        return {"out": str(out), "model": str(out / MODEL), **{k: manifest.data.get(k) for k in ("format", "routing")}}
    if dist.is_main() and not (out / "upcycle_config.yaml").exists():
        dump_config(cfg, out / "upcycle_config.yaml")
    source = MixSource(mix, cfg.shared)
    report: dict = {}
    if cfg.router_init == "random":
        source.routers = random_routers(mix, spec, cfg.seed)
    elif cfg.router_init == "cheap_embed":
        source.routers = cheap_embed_routers(mix, cfg, tokenizer)
    else:
        source.routers = random_routers(mix, spec, cfg.seed)
        model = in_memory_model(mix, source, spec)
        if cfg.router_init == "prompts":
            source.routers = prompt_routers(model, cfg, tokenizer)
        else:
            source.routers, report = ppl_routers(model, cfg, samples, tokenizer, out, progress)
        del model

    def write() -> dict:  # rank 0: the routers and the model folder
        routers = {f"model.layers.{l}.mlp.router.weight": w.contiguous() for l, w in source.routers.items()}
        atomic_write_file(out / ROUTERS, lambda tmp: save_file(routers, tmp, metadata={"format": "pt"}))

        def extra(tmp: Path) -> None:
            mix.base.copy_tokenizer(tmp)
            dump_config(cfg, tmp / "upcycle_config.yaml")

        base_ref = None
        if mix.kind == "lora" and cfg.export.lora_storage == "compact":
            outside = sorted(source.lora_other_deltas())
            if outside:  # a compact folder holds the MoE tensors only; the rest is read back from the base
                raise UpcycleError(f"export.lora_storage: compact keeps only the base's weights outside the MLPs, but the "
                                   f"adapters also change {outside[0]} (shared={cfg.shared!r}); use "
                                   "export.lora_storage=materialize, or shared=base to leave those deltas out")
            base_ref = {"path": str(mix.base.path.resolve()), "fingerprint": mix.base.fingerprint()}
        moe_dtype = mix.base.reader().tensors[f"model.layers.{mix.layers[0]}.mlp.gate_proj.weight"].dtype
        provenance = {"tool": "upcycle mix", "base": str(mix.base.path.resolve()), "base_fingerprint": mix.base.fingerprint(),
                      "experts": mix.checks, "shared": cfg.shared, "router_init": cfg.router_init, "moe_layers": mix.layers}
        written = write_moe_folder(out / MODEL, target=target, dense_cfg=mix.config, spec=spec, moe_layers=mix.layers,
                                   passthrough=passthrough(mix), provider=source, moe_dtype=moe_dtype, export=cfg.export,
                                   force=True, extra=extra, provenance=provenance, base_ref=base_ref, progress=progress,
                                   card=card_info(cfg, mix, method), inputs=reads)
        manifest.data.update(format=written["format"], files=written["files"], parameters=written["parameters"],
                             checks=[{**c, "expert": stored_path(c["expert"], out)} for c in mix.checks],
                             routing=report, complete=True)
        manifest.save()
        return {"format": written["format"]}

    written = dist.on_rank_zero_then_wait(write)
    return {"out": str(out), "model": str(out / MODEL), "format": written["format"], "routing": report,
            "seconds": time.perf_counter() - started}
