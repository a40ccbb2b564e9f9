"""`upcycle run RECIPE.yaml [key=value ...]`: a recipe's stages in order, with a run manifest.

A recipe names its stages (prepare, expand, route, post_train) and configures each; the pipeline
fills in what connects them (each stage's input is the previous stage's folder under `out`, and
all share `base`, `data` and `seed`). The run manifest (`out/run.json`) records, per stage, the
config hash and the content hash of the stage's own manifest when it finished. On a rerun a
finished stage whose manifest is unchanged is skipped; an unfinished one resumes (each stage
resumes from its last complete checkpoint); a stage whose folder was made by a different config
is refused by the stage itself, unless `--redo STAGE` clears it and every stage after it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from upcycle.config import (DataSpec, ExpandConfig, PostTrainConfig, PrepareConfig, RouteConfig, _Section, config_hash,
                            dump_config)
from upcycle.errors import UpcycleError
from upcycle.io.atomic import atomic_write_text
from upcycle.manifest import MANIFEST

StageName = Literal["prepare", "expand", "route", "post_train"]
ORDER: tuple[str, ...] = ("prepare", "expand", "route", "post_train")
RUN_MANIFEST = "run.json"


class RunConfig(_Section):
    """A recipe: which stages run, and each stage's settings. Paths between stages are filled in."""

    recipe: str = Field("custom", description="The recipe's name, recorded with its results.")
    description: str = ""
    base: str = Field("bundled:suite-base", description="The dense model (folder or bundled alias).")
    out: Path
    seed: int = 0
    data: DataSpec = Field(default_factory=DataSpec)
    stages: list[StageName] = Field(default_factory=lambda: list(ORDER))
    prepare: PrepareConfig = Field(default_factory=PrepareConfig)
    expand: ExpandConfig = Field(default_factory=ExpandConfig)
    route: RouteConfig = Field(default_factory=RouteConfig)
    post_train: PostTrainConfig = Field(default_factory=PostTrainConfig)
    evaluate: bool = True
    eval_max_items: int | None = Field(None, gt=0)


def stage_configs(run: RunConfig) -> dict[str, object]:
    """Each stage's full config: the recipe's section with the run-wide values and paths filled in."""
    out, common = Path(run.out), {"seed": run.seed}
    stages = run.stages
    unknown_order = [s for s in stages if s not in ORDER]
    if unknown_order or stages != sorted(stages, key=ORDER.index):
        raise UpcycleError(f"stages: {stages} must be in the order {list(ORDER)}")
    cfgs: dict[str, object] = {}
    if "prepare" in stages:
        cfgs["prepare"] = run.prepare.model_copy(update={**common, "base": run.base, "out": out / "prepare", "data": run.data,
                                                         "evaluate": run.evaluate, "eval_max_items": run.eval_max_items})
    if "expand" in stages:
        if "prepare" not in stages:
            raise UpcycleError("stages: expand needs prepare before it")
        cfgs["expand"] = run.expand.model_copy(update={**common, "prepare": out / "prepare", "out": out / "expand"})
    if "route" in stages:
        if "expand" not in stages:
            raise UpcycleError("stages: route needs expand before it")
        cfgs["route"] = run.route.model_copy(update={**common, "expand": out / "expand", "out": out / "route", "data": run.data})
    if "post_train" in stages:
        pt = run.post_train
        update = {**common, "out": out / "post_train", "data": run.data, "evaluate": run.evaluate,
                  "eval_max_items": run.eval_max_items}
        if pt.source == "upit":
            if "expand" not in stages:
                raise UpcycleError("post_train.source upit needs the expand stage; use source: upcycle to upcycle a dense model")
            update.update(expand=out / "expand", route=(out / "route") if "route" in stages else None)
        else:
            dense = pt.dense or ("@prepare" if "prepare" in stages else "@base")
            update["dense"] = {"@base": run.base, "@prepare": f"prepare:{out / 'prepare'}"}.get(dense, dense)
        cfgs["post_train"] = pt.model_copy(update=update)
    return cfgs


def _module(stage: str):
    import importlib
    return importlib.import_module(f"upcycle.stages.{stage}")


def _stage_digest(folder: Path) -> str | None:
    path = folder / MANIFEST
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else None


def results_of(cfgs: dict, out: Path) -> dict:
    """The recipe's result: the post-trained model's suite scores, or the last stage-1 checkpoint's."""
    if "post_train" in cfgs:
        m = json.loads((out / "post_train" / MANIFEST).read_text())
        return {"scores": m.get("scores"), "average": m.get("average"), "model": str(out / "post_train" / "model"),
                "expert_load_entropy": m.get("expert_load_entropy")}
    m = json.loads((out / "prepare" / MANIFEST).read_text())
    last = m["checkpoints"][-1]
    return {"scores": last.get("scores"), "average": last.get("average"), "model": str(out / "prepare" / last["path"])}


def run(cfg: RunConfig, progress: bool = True, redo: list[str] | None = None) -> dict:
    started = time.perf_counter()
    cfgs = stage_configs(cfg)  # every stage config is checked before anything runs
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    record_path = out / RUN_MANIFEST
    record = json.loads(record_path.read_text()) if record_path.is_file() else {"recipe": cfg.recipe, "stages": {}}
    dump_config(cfg, out / "recipe_resolved.yaml")
    for name in redo or []:
        if name not in cfgs:
            raise UpcycleError(f"--redo {name}: not a stage of this recipe ({', '.join(cfgs)})")
    if redo:
        first = min(ORDER.index(r) for r in redo)
        for stage in [s for s in cfgs if ORDER.index(s) >= first]:
            shutil.rmtree(out / stage, ignore_errors=True)
            record["stages"].pop(stage, None)
    for stage, stage_cfg in cfgs.items():
        folder = out / stage
        done = record["stages"].get(stage)
        if done and done.get("status") == "done" and done.get("config_hash") == config_hash(stage_cfg) \
                and done.get("manifest_sha256") == _stage_digest(folder):
            if progress:
                print(f"[{cfg.recipe}] {stage}: done, skipped", flush=True)
            continue
        if progress:
            print(f"[{cfg.recipe}] {stage}: running", flush=True)
        record["stages"][stage] = {"status": "running", "config_hash": config_hash(stage_cfg)}
        atomic_write_text(record_path, json.dumps(record, indent=2))
        t0 = time.perf_counter()
        _module(stage).run(stage_cfg, progress=progress)
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            if dist.get_rank() != 0:
                continue
        record["stages"][stage] = {"status": "done", "config_hash": config_hash(stage_cfg),
                                   "manifest_sha256": _stage_digest(folder), "seconds": round(time.perf_counter() - t0, 1)}
        atomic_write_text(record_path, json.dumps(record, indent=2))
    result = {"recipe": cfg.recipe, "stages": list(cfgs), **(results_of(cfgs, out) if cfg.evaluate else {}),
              "seconds": time.perf_counter() - started}
    atomic_write_text(out / "results.json", json.dumps(result, indent=2, default=str))
    return {"out": str(out), **result}
