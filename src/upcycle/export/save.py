"""Write an MoE as the stock transformers class that expresses it exactly, or in upcycle's own format.

Format choice (SPEC section 5): Mixtral renormalizes top-k (topk_softmax); Qwen2-MoE and Qwen3-MoE
have norm_topk_prob and so express softmax_topk too; Qwen3-MoE has q/k norms, so only Qwen3 dense
models map to it. A requested format that cannot express the model is refused with the reason;
`auto` takes the first that can, else the own format (`upcycle.load_moe` reads it back).

Both paths, streaming from a dense checkpoint (stages/build.py) and saving a model in memory
(`save_moe`), go through `write_moe_folder`: plan, stream the shards, write config, metadata and
the model card (README.md, export/model_card.py).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterable

import torch
from transformers import AutoConfig

from upcycle.architectures import FORMAT_PREFERENCE, MOE_FORMATS, OWN_FORMAT, MoEFormat
from upcycle.config import ExportSpec, MoESpec, parse_size
from upcycle.dense_config import format_config, format_problem
from upcycle.errors import UpcycleError
from upcycle.export.model_card import CardFacts, base_identity, model_card
from upcycle.export.plan import PlanEntry, build_plan, write_plan
from upcycle.io.atomic import atomic_dir, check_output_size, atomic_write_text
from upcycle.models import hub_repo_of
from upcycle.moe.layer import LayerDims

MODEL_DIR = "model"
"""Where a stage (mix, route with trained experts, post-train) writes the model it makes: OUT/model,
beside its records (build and merge, whose out folder is nothing but the model, write OUT itself)."""
OWN_META = "upcycle_moe.json"
PROVENANCE = "upcycle_provenance.json"
CARD = "README.md"
# What an exporter's caller may tell the card: how the model was made (CardFacts fields), and the base folder.
CARD_KEYS = frozenset({"base", "method", "init", "stages", "data", "scores", "tool"})
OWN_FORMAT_VERSION = 1
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_format(requested: str, dense_cfg: dict, spec: MoESpec, lora_storage: str = "materialize") -> MoEFormat | str:
    """The format to write, or an UpcycleError saying why the requested one cannot hold this MoE."""
    if spec.expert_type == "lora" and lora_storage == "compact":
        if requested not in ("auto", OWN_FORMAT):
            raise UpcycleError(f"export.format: {requested} cannot store LoRA experts compactly; "
                               "use --format upcycle, or export.lora_storage=materialize")
        return OWN_FORMAT
    if requested == OWN_FORMAT:
        return OWN_FORMAT
    if requested == "auto":
        for name in FORMAT_PREFERENCE:
            if format_problem(MOE_FORMATS[name], dense_cfg, spec) is None:
                return MOE_FORMATS[name]
        return OWN_FORMAT
    fmt = MOE_FORMATS[requested]
    reason = format_problem(fmt, dense_cfg, spec)
    if reason:
        raise UpcycleError(f"export.format: {reason}")
    return fmt


EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
UNTIED_BY_DEFAULT = ("qwen2_moe",)  # llama.cpp's Qwen2-MoE loader requires output.weight (its others fall back)


def unties_head(export: ExportSpec, target: MoEFormat | str, dense_cfg: dict, passthrough: dict, compact: bool) -> bool:
    """Whether the head of a tied-embedding model is written as its own tensor (ExportSpec.untie_embeddings)."""
    if compact or target == OWN_FORMAT or not dense_cfg.get("tie_word_embeddings") or EMBED not in passthrough \
            or HEAD in passthrough:
        return False
    if export.untie_embeddings == "auto":
        return target.name in UNTIED_BY_DEFAULT
    return bool(export.untie_embeddings)


def plan_dtype(plan: list[PlanEntry], name: str) -> torch.dtype:
    return next(e.dtype for e in plan if e.name == name)


def format_name(target: MoEFormat | str) -> str:
    return target if isinstance(target, str) else target.name


def native_config(fmt: MoEFormat, dense_cfg: dict, spec: MoESpec, dims: LayerDims, moe_layers: list[int],
                  out_dtype: torch.dtype | None):
    """The target class's config, built through transformers' own config class (so it validates)."""
    dense_layers = [l for l in range(dense_cfg["num_hidden_layers"]) if l not in moe_layers]
    values = format_config(fmt, dense_cfg, spec, dims.expert_width, dims.shared_width, dims.intermediate, dense_layers)
    if out_dtype is not None:
        values["dtype"] = str(out_dtype).removeprefix("torch.")
    model_type = values.pop("model_type")
    return AutoConfig.for_model(model_type, **values)


def write_moe_folder(
    out: Path, *, target: MoEFormat | str, dense_cfg: dict, spec: MoESpec, moe_layers: list[int],
    passthrough: dict[str, tuple[tuple[int, ...], torch.dtype]], provider: Callable[[tuple], torch.Tensor],
    moe_dtype: torch.dtype, export: ExportSpec, force: bool, extra: Callable[[Path], None] | None = None,
    provenance: dict | None = None, base_ref: dict | None = None, progress: bool = True, card: dict | None = None,
    inputs: Iterable[str | Path | None] = (), input_bytes: int | None = None,
) -> dict:
    """Plan, stream and finish one output folder atomically. Returns a summary for reports.

    The model card draws on `provenance` and `card` (what made the model: base, method, init,
    stages, data, scores; keys of CardFacts); its facts are kept in the provenance file so that
    `update_card` can add scores measured later.
    """
    dims = LayerDims(dense_cfg["hidden_size"], dense_cfg["intermediate_size"], spec)
    out_dtype = TORCH_DTYPES.get(export.dtype)
    compact = target == OWN_FORMAT and spec.expert_type == "lora" and export.lora_storage == "compact"
    plan: list[PlanEntry] = build_plan(target, passthrough, moe_layers, dims, dense_cfg["hidden_act"],
                                       moe_dtype, out_dtype, compact=compact)
    if target != OWN_FORMAT:
        config = native_config(target, dense_cfg, spec, dims, moe_layers, out_dtype)
        if unties_head(export, target, dense_cfg, passthrough, compact):
            embed = passthrough[EMBED]
            plan.append(PlanEntry(HEAD, tuple(embed[0]), plan_dtype(plan, EMBED), (("tensor", EMBED),)))
            config.tie_word_embeddings = False
    unknown = set(card or {}) - CARD_KEYS
    if unknown:
        raise TypeError(f"write_moe_folder: card keys {sorted(unknown)} are not among {sorted(CARD_KEYS)}")
    made = {**(provenance or {}), **(card or {})}
    base_model, base_card = base_identity(made.get("base"), dense_cfg)
    cached = hub_repo_of(Path(made["base"])) if made.get("base") else None
    facts = CardFacts(
        name=Path(out).name, spec=spec.model_dump(mode="json"), format=format_name(target),
        model_class=None if target == OWN_FORMAT else target.hf_class, moe_layers=len(moe_layers),
        num_layers=dense_cfg["num_hidden_layers"], parameters=parameter_counts(plan, spec),
        dtype=str(out_dtype or moe_dtype).removeprefix("torch."), base_model=base_model, base_card=base_card,
        base_revision=cached[1] if cached else None,
        compact_base=f"{base_model or Path(base_ref['path']).name}, fingerprint {base_ref['fingerprint']}"
        if compact and base_ref else None,
        **{k: made[k] for k in CARD_KEYS - {"base"} if made.get(k) is not None})
    planned_bytes = sum(e.planned().nbytes for e in plan)
    if input_bytes is not None:
        check_output_size(Path(out), planned_bytes, input_bytes, force)
    started = time.perf_counter()
    with atomic_dir(out, force=force, inputs=inputs, planned_bytes=planned_bytes) as tmp:
        files = write_plan(plan, tmp, parse_size(export.max_shard_size), provider, progress=progress,
                           desc=f"writing {format_name(target)}")
        if target == OWN_FORMAT:
            meta = {"upcycle_format": OWN_FORMAT_VERSION, "spec": spec.model_dump(mode="json"), "moe_layers": moe_layers,
                    "base_config": dense_cfg, "compact": compact, "base": base_ref if compact else None,
                    "dtype": str(out_dtype or moe_dtype).removeprefix("torch.")}
            (tmp / OWN_META).write_text(json.dumps(meta, indent=2, default=str))
        else:
            config.to_json_file(tmp / "config.json")
        if extra is not None:
            extra(tmp)
        (tmp / PROVENANCE).write_text(json.dumps({**(provenance or {}), "card": asdict(facts)}, indent=2, default=str))
        (tmp / CARD).write_text(model_card(facts))  # after `extra`: a base's README copied there is replaced
    return {
        "format": format_name(target), "files": files, "tensors": len(plan), "parameters": facts.parameters,
        "bytes": planned_bytes, "write_seconds": time.perf_counter() - started,
    }


def update_card(folder: str | Path, **changes) -> str:
    """Rewrite an exported folder's card with more facts (e.g. scores=...); returns the new text."""
    folder = Path(folder)
    record = json.loads((folder / PROVENANCE).read_text())
    facts = CardFacts(**{**record["card"], **changes})
    text = model_card(facts)
    atomic_write_text(folder / PROVENANCE, json.dumps({**record, "card": asdict(facts)}, indent=2, default=str))
    atomic_write_text(folder / CARD, text)
    return text


ROUTED_ROLES = ("expert", "lora_A", "lora_B")


def parameter_counts(plan: list[PlanEntry], spec: MoESpec) -> dict[str, int]:
    """Stored parameters, and those a token uses: only top_k of num_experts routed experts run."""
    total = sum(math.prod(e.shape) for e in plan)
    routed = sum(math.prod(e.shape) for e in plan if e.parts[0][0] == "moe" and e.parts[0][2] in ROUTED_ROLES)
    idle = routed * (spec.num_experts - spec.top_k) // spec.num_experts
    return {"total": total, "active": total - idle}


def save_moe(model, out: str | Path, format: str = "auto", dtype: str = "auto", max_shard_size: str = "2GB",
             lora_storage: str = "materialize", force: bool = False, tokenizer=None, base_path: str | Path | None = None,
             progress: bool = True, card: dict | None = None, untie_embeddings: bool | str = "auto") -> dict:
    """Save an in-memory MoE (from `upcycle_model`) as a native transformers MoE or the own format.

    For compact LoRA storage, `base_path` names the dense folder the adapters are loaded back onto.
    `card` adds what the model card should say about how the model was made (keys of
    model_card.CardFacts: base, method, init, stages, data, scores, tool).
    """
    from upcycle.io.model_folder import ModelFolder
    from upcycle.moe.model import moe_blocks

    spec: MoESpec = getattr(model, "upcycle_spec", None)
    if spec is None:
        raise UpcycleError("save_moe: this model has no MoE layers; upcycle it first (upcycle_model)")
    export = ExportSpec(format=format, dtype=dtype, max_shard_size=max_shard_size, lora_storage=lora_storage,
                        untie_embeddings=untie_embeddings)
    dense_cfg = model.config.to_dict()
    # The Trainer switches the cache off for training (TrainingArguments.use_cache is False); the
    # shipped model generates with it, as every stock config does by default.
    dense_cfg["use_cache"] = True
    target = resolve_format(export.format, dense_cfg, spec, export.lora_storage)
    blocks = dict(moe_blocks(model))
    moe_layers = sorted(blocks)
    state = model.state_dict()
    moe_prefixes = tuple(f"model.layers.{l}.mlp." for l in moe_layers)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    passthrough = {k: (tuple(v.shape), v.dtype) for k, v in state.items()
                   if not k.startswith(moe_prefixes) and not (tied and k == "lm_head.weight")}

    def provider(part: tuple) -> torch.Tensor:
        if part[0] == "tensor":
            return state[part[1]]
        return blocks[part[1]].get(part[2:])

    base_ref = None
    if target == OWN_FORMAT and spec.expert_type == "lora" and export.lora_storage == "compact":
        if base_path is None:
            raise UpcycleError("save_moe: compact LoRA storage needs base_path, the dense folder to load the adapters onto")
        folder = ModelFolder(base_path)
        base_ref = {"path": str(Path(base_path).resolve()), "fingerprint": folder.fingerprint()}

    def extra(tmp: Path) -> None:
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    moe_dtype = next(iter(blocks.values())).router.weight.dtype
    return write_moe_folder(
        Path(out), target=target, dense_cfg=dense_cfg, spec=spec, moe_layers=moe_layers, passthrough=passthrough,
        provider=provider, moe_dtype=moe_dtype, export=export, force=force, extra=extra,
        provenance={"tool": "upcycle", "source": "save_moe", "spec": spec.model_dump(mode="json")},
        base_ref=base_ref, progress=progress, card=card,
    )
