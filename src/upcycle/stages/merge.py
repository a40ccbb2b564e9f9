"""`upcycle merge CONFIG`: merge whole checkpoints with one of the merge methods, streaming.

    method: ties
    base: path/to/base
    models: [{path: a, weight: 1.0}, {path: b, weight: 0.5}]
    out: merged/
    density: 0.5        # kept fraction: ties by magnitude, dare/dare_ties at random (drop_p = 1 - density)

The story: open every folder and check that all share the same tensors (names, shapes); plan
the output from the base's headers; for each tensor read it from every model, merge, write, and
forget it. Peak memory: (models + 1) tensors. Config, tokenizer and generation config come from
the base (or the first model for `linear`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from upcycle.models import resolve_model
from upcycle.config import MergeConfig, parse_size
from upcycle.config_io import dump_config
from upcycle.errors import UpcycleError
from upcycle.export.model_card import merge_card
from upcycle.export.plan import PlanEntry, write_plan
from upcycle.export.save import TORCH_DTYPES
from upcycle.io.atomic import atomic_dir, claim_output
from upcycle.io.model_folder import ModelFolder
from upcycle.io.safetensors_io import release_memory
from upcycle.merge.methods import METHODS, MergeParams, merge_tensor
from upcycle.seeding import generator


def check_same_tensors(reference, ref_path: Path, others: list[tuple[Path, object]]) -> None:
    """Every model must have exactly the reference's tensors with the same shapes; name the first difference."""
    ref = reference.tensors
    for path, reader in others:
        for name in ref:
            if name not in reader.tensors:
                raise UpcycleError(f"model {path}: has no tensor {name} (present in {ref_path})")
            if tuple(reader.tensors[name].shape) != tuple(ref[name].shape):
                raise UpcycleError(f"model {path}: tensor {name} has shape {list(reader.tensors[name].shape)}, "
                                   f"{ref_path} has {list(ref[name].shape)}")
        extra = [n for n in reader.tensors if n not in ref]
        if extra:
            raise UpcycleError(f"model {path}: has tensor {extra[0]} that {ref_path} does not")


def check_finite(name: str, merged: torch.Tensor, cfg: MergeConfig) -> None:
    """A NaN or inf in the result (NaN in a model, an overflow in the output dtype) is refused, not written."""
    bad = (~torch.isfinite(merged)).sum().item()
    if bad:
        raise UpcycleError(f"merge: tensor {name} holds {bad} NaN/inf values after the {cfg.method} merge "
                           f"(in {merged.dtype}); check the models' weights and the merge weights/scale; nothing was written")


def run(cfg: MergeConfig, progress: bool = True) -> dict:
    started = time.perf_counter()
    method = METHODS[cfg.method]
    model_paths = [resolve_model(m.path) for m in cfg.models]
    inputs = [*model_paths, resolve_model(cfg.base) if cfg.base is not None else None]
    claim_output(cfg.out, inputs, cfg.force)
    folders = [ModelFolder(p, allow_pickle=cfg.allow_pickle, what="model") for p in model_paths]
    base_folder = ModelFolder(resolve_model(cfg.base), allow_pickle=cfg.allow_pickle) if method.uses_base else None
    readers = [f.reader() for f in folders]
    ref_folder = base_folder or folders[0]
    ref = base_folder.reader() if base_folder else readers[0]
    check_same_tensors(ref, ref_folder.path, list(zip(model_paths, readers)))

    params = MergeParams(weights=tuple(m.weight for m in cfg.models), scale=cfg.scale, density=cfg.density,
                         drop_p=cfg.drop_p, dare_rescale=cfg.dare_rescale, sign_method=cfg.sign_method, normalize=cfg.normalize)
    out_dtype = TORCH_DTYPES.get(cfg.dtype)
    # The readers refuse non-float tensors (quantized weights), so every tensor here is merged.
    plan = [PlanEntry(name, tuple(info.shape), out_dtype or info.dtype, (("tensor", name),))
            for name, info in ref.tensors.items()]
    dtypes = {e.name: e.dtype for e in plan}

    def provider(part: tuple) -> torch.Tensor:
        name = part[1]
        base = ref.get(name) if base_folder else None
        tensors = [r.get(name) for r in readers]
        gens = [generator(cfg.seed, "merge", name, i) for i in range(len(tensors))]
        merged = merge_tensor(method, base, tensors, params, gens).to(dtypes[name])
        del tensors, base
        release_memory()
        check_finite(name, merged, cfg)
        return merged

    with atomic_dir(cfg.out, force=cfg.force, inputs=inputs) as tmp:
        files = write_plan(plan, tmp, parse_size(cfg.max_shard_size), provider, progress=progress, desc=f"merging ({cfg.method})")
        config = dict(ref_folder.config)
        if out_dtype is not None:
            config["dtype"] = cfg.dtype
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        ref_folder.copy_tokenizer(tmp)
        (tmp / "README.md").write_text(merge_card(cfg, folders, base_folder))
        dump_config(cfg, tmp / "upcycle_config.yaml")
    return {"out": str(cfg.out), "method": cfg.method, "tensors": len(plan), "files": files,
            "seconds": time.perf_counter() - started}
