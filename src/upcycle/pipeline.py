"""`upcycle run RECIPE.yaml [key=value ...]`: a recipe's stages in order, with a run manifest.

A recipe names its stages (UpIT: prepare, expand, route, post_train; experts trained apart:
branch, mix, post_train) and configures each; the pipeline
fills in what connects them (each stage's input is the previous stage's folder under `out`, and
all share `base`, `data` and `seed`). The run manifest (`out/run.json`) records, per stage, the
config hash and the content hash of the stage's own manifest when it finished. Neither depends on
where the run folder lies (config_hash takes the paths inside it relative to it; manifests store
them relative to their own folder: upcycle/manifest.py), so a run folder can be moved whole and
rerun with the new `out`. On a rerun a
finished stage whose manifest is unchanged is skipped; an unfinished one resumes (each stage
resumes from its last complete checkpoint); a stage whose folder was made by a different config
is refused before anything is written, unless `--redo STAGE` clears it and every stage after it.
One `upcycle run` writes a run folder at a time (a lock beside it, held by rank 0 under torchrun:
upcycle/distributed.py states which rank does what),
and a run folder may not be, contain or lie inside the base or a data file.

Everything a stage would fail on is refused before any stage runs: each section's own validator
(config.py), `RunConfig`'s checks across stages (checkpoint counts, the expert pool, a per-stage
seed or data that contradicts the recipe's), and `check_base`, which reads the base's config.json.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, model_validator

from upcycle.config import (AT, EVAL_CHECKPOINTS_HELP, EVALUATE_HELP, BranchConfig, DataSpec, EvalCheckpoints, Evaluate,
                            ExpandConfig, MixConfig, PostTrainConfig, PrepareConfig, RouteConfig, _Section, base_problems,
                            checkpoints_to_score, refuse, scores_suite)

from upcycle.config_io import EVAL_KEYS, config_hash, dump_config
from upcycle.errors import UpcycleError
from upcycle.io.atomic import atomic_write_text
from upcycle.manifest import MANIFEST, json_object, read_manifest, stored_path

StageName = Literal["prepare", "branch", "expand", "route", "mix", "post_train"]
ORDER: tuple[str, ...] = ("prepare", "branch", "expand", "route", "mix", "post_train")
UPIT: tuple[str, ...] = ("prepare", "expand", "route", "post_train")  # the default recipe's stages
# A stage that needs another before it in the same recipe.
NEEDS = {"expand": "prepare", "route": "expand", "mix": "branch"}
RUN_MANIFEST = "run.json"
# Bundled models made on first use (a GGUF converted to safetensors): `check_base` does not convert them.
CONVERTED_ON_FIRST_USE = ("bundled:smollm2",)
# What a recipe sets once for all its stages: each stage's own key must agree with it or be left out.
SHARED: dict[str, tuple[str, ...]] = {"prepare": ("seed", "data", "evaluate", "eval_max_items", "eval_checkpoints"),
                                      "expand": ("seed",),
                                      "route": ("seed", "data"), "post_train": ("seed", "data", "evaluate", "eval_max_items"),
                                      "branch": ("seed", "data"), "mix": ("seed", "data")}


class RunConfig(_Section):
    """A recipe: which stages run, and each stage's settings. Paths between stages are filled in."""

    recipe: str = Field("custom", description="The recipe's name, recorded with its results.")
    description: str = ""
    base: str = Field("bundled:suite-base", description="The dense model (folder or bundled alias).")
    out: Path
    seed: int = 0
    data: DataSpec = Field(default_factory=DataSpec)
    stages: list[StageName] = Field(default_factory=lambda: list(UPIT))
    prepare: PrepareConfig = Field(default_factory=PrepareConfig)
    expand: ExpandConfig = Field(default_factory=ExpandConfig)
    route: RouteConfig = Field(default_factory=RouteConfig)
    post_train: PostTrainConfig = Field(default_factory=PostTrainConfig)
    branch: BranchConfig = Field(default_factory=BranchConfig)
    mix: MixConfig = Field(default_factory=MixConfig)
    evaluate: Evaluate = Field("auto", description=EVALUATE_HELP)
    eval_max_items: int | None = Field(None, gt=0)
    eval_checkpoints: EvalCheckpoints = Field("auto", description=EVAL_CHECKPOINTS_HELP)
    report_to: list[str] | None = Field(None, description="Where every training stage sends the Trainer's logs, e.g. "
                                        "[tensorboard] or [wandb] (a stage's own train.report_to wins).")

    @model_validator(mode="after")
    def _consistent(self):
        """Refuse what the stages would fail on; fill in what the recipe sets for every stage."""
        problems = stage_order_problems(self.stages)
        if _source_upit(self) and "expand" not in self.stages and "mix" not in self.stages:
            problems.append(f"{AT}post_train.source: upit needs the expand stage in {AT}stages (or mix, for "
                            "experts trained apart); use source: upcycle to upcycle a dense model")
        if "mix" in self.stages and "post_train" in self.stages and not _source_upit(self):
            problems.append(f"{AT}post_train.source: upcycle upcycles a dense model, but this recipe mixes experts; "
                            "use source: upit (post-training the mixed MoE)")
        if "mix" in self.stages and "expand" in self.stages:
            problems.append(f"{AT}stages: expand and mix both make the expert pool post_train trains; keep one")
        if "mix" in self.stages and "post_train" in self.stages and self.mix.export.format not in ("auto", "upcycle"):
            problems.append(f"{AT}mix.export.format: {self.mix.export.format}, but post_train reads the mixed MoE in "
                            f"the upcycle format; remove it (the recipe's model is post_train's, exported as "
                            f"{AT}post_train.export says)")
        problems += shared_problems(self) + link_problems(self) + pool_problems(self)
        refuse(problems)
        for stage, fills in implied_values(self).items():  # the dumped recipe then shows what each stage runs with
            section = getattr(self, stage)
            filled = section.model_copy(update=fills)
            filled.__pydantic_fields_set__ = set(section.model_fields_set)  # filled, not given: a later change re-fills
            self.__dict__[stage] = filled
        return self


def stage_order_problems(stages: list[str]) -> list[str]:
    if len(set(stages)) != len(stages) or stages != sorted(stages, key=ORDER.index):
        return [f"{AT}stages: {stages} must be in the order {list(ORDER)}, each once"]
    problems = [f"{AT}stages: {s} needs {NEEDS[s]} before it" for s in stages if s in NEEDS and NEEDS[s] not in stages]
    return problems


def _source_upit(run: RunConfig) -> bool:
    return "post_train" in run.stages and run.post_train.source == "upit"


_RECIPES_OWN = object()  # shared_value's default: the recipe's own value (None is a real value of some keys)


def shared_value(run: RunConfig, key: str, value=_RECIPES_OWN):
    """A SHARED key's value (the recipe's, or `value`) as its stages get it: `eval_checkpoints: auto` is
    resolved here, where it is known whether stage 1's model is the recipe's deliverable (its last stage)."""
    value = getattr(run, key) if value is _RECIPES_OWN else value
    if key == "eval_checkpoints":
        return checkpoints_to_score(value, delivers=run.stages[-1] == "prepare")
    return value


def shared_problems(run: RunConfig) -> list[str]:
    """A stage's own seed/data/evaluate that contradicts the recipe's is refused, naming each differing key."""
    problems = []
    connected = links(run)
    for stage, keys in SHARED.items():
        section = getattr(run, stage)
        for key in keys:
            if key in section.model_fields_set and key not in connected[stage]:  # a connected key: link_problems
                problems += [f"{AT}{stage}.{k}: {mine!r} contradicts the recipe's {k}={theirs!r}; every stage of a "
                             f"recipe runs with its top-level {key}: change {k} instead, or remove {stage}.{key}"
                             for k, mine, theirs in _differences(key, shared_value(run, key, getattr(section, key)),
                                                                 shared_value(run, key))]
    return problems


def _differences(key: str, mine, theirs) -> list[tuple[str, object, object]]:
    """(dotted key, mine, theirs) for every leaf where two values (sections compared field by field) differ."""
    if isinstance(mine, BaseModel) and isinstance(theirs, BaseModel):
        mine, theirs = mine.model_dump(mode="json", by_alias=True), theirs.model_dump(mode="json", by_alias=True)
    if isinstance(mine, dict) and isinstance(theirs, dict):
        return [d for k in mine for d in _differences(f"{key}.{k}", mine[k], theirs.get(k))]
    return [] if mine == theirs else [(key, mine, theirs)]


def links(run: RunConfig) -> dict[str, dict]:
    """Each stage's input and output folders (and post_train's dense source): the recipe connects them."""
    out = Path(run.out)
    result: dict[str, dict] = {"prepare": {"base": run.base, "out": out / "prepare"},
                               "expand": {"prepare": out / "prepare", "out": out / "expand"},
                               "route": {"expand": out / "expand", "out": out / "route"},
                               "post_train": {"out": out / "post_train"},
                               "branch": {"base": run.base, "out": out / "branch"},
                               "mix": {"base": run.base, "branch": out / "branch", "out": out / "mix"}}
    pt = run.post_train
    if "branch" in run.stages and run.branch.data_source == "self_generated":
        # Self-MoE trains its router on the union of the data the base wrote, not on the given rows.
        from upcycle.stages.branch import generated_union

        union = str(generated_union(out / "branch"))
        result["post_train"]["data"] = run.data.model_copy(update={"train": [union], "eval": None, "limit": None})
    if pt.source == "upit" and "mix" in run.stages:  # the mix folder is both the pool and the routed MoE
        result["post_train"].update(expand=out / "mix", route=out / "mix")
    elif pt.source == "upit":
        result["post_train"].update(expand=out / "expand", route=(out / "route") if "route" in run.stages else None)
    else:
        dense = pt.dense or ("@prepare" if "prepare" in run.stages else "@base")
        result["post_train"]["dense"] = {"@base": run.base, "@prepare": f"prepare:{out / 'prepare'}"}.get(dense, dense)
    return result


def link_problems(run: RunConfig) -> list[str]:
    problems = []
    for stage, values in links(run).items():
        section = getattr(run, stage)
        for key, value in values.items():
            given = getattr(section, key)
            if key != "dense" and key in section.model_fields_set and given is not None and given != value:
                problems.append(f"{AT}{stage}.{key}: {given}, but a recipe connects its stages itself "
                                f"(here {stage}.{key} is {value}); remove it")
    if run.post_train.dense == "@prepare" and "prepare" not in run.stages and "post_train" in run.stages:
        problems.append(f"{AT}post_train.dense: @prepare needs the prepare stage in {AT}stages; use @base or a model folder")
    return problems


def pool_problems(run: RunConfig) -> list[str]:
    """UpIT: prepare saves K checkpoints, expand selects some and grows them to N experts, which route
    and post_train route over. Checked on counts alone, before anything is trained."""
    prep, exp = run.prepare, run.expand
    if "expand" not in run.stages:
        return []
    saved = prep.checkpoint_count()
    selected = exp.selected_indices(saved)
    beyond = [i for i in selected if i >= saved]
    if beyond:
        problems = [f"{AT}expand.checkpoints: indices {beyond} out of range; prepare saves checkpoints 0..{saved - 1} "
                    f"({AT}prepare.train.epochs={prep.train.epochs} / {AT}prepare.save_every={prep.save_every})"]
    elif isinstance(exp.checkpoints, str):  # an explicit list's length was checked by ExpandConfig itself
        problems = [f"{p} (prepare saves {saved} checkpoints: {AT}prepare.train.epochs / {AT}prepare.save_every)"
                    for p in exp.pool_problems(len(selected), at=f"{AT}expand.")]
    else:
        problems = []
    pool = exp.num_experts
    kind = "lora" if prep.mode == "lora" else "mlp"
    for stage in ("route", "post_train"):
        if stage not in run.stages or (stage == "post_train" and not _source_upit(run)):
            continue
        moe = getattr(run, stage).moe
        key = f"{AT}{stage}.moe."
        if "num_experts" in moe.model_fields_set and moe.num_experts != pool:
            problems.append(f"{key}num_experts: {moe.num_experts} contradicts {AT}expand.num_experts={pool}, the pool "
                            f"{stage} routes over; set one value, or remove {stage}.moe.num_experts")
        elif moe.top_k > pool:
            problems.append(f"{key}top_k: {moe.top_k} is larger than {AT}expand.num_experts={pool}, the pool {stage} "
                            "routes over; choose top_k <= num_experts")
        if "expert_type" in moe.model_fields_set and moe.expert_type != kind:
            problems.append(f"{key}expert_type: {moe.expert_type} contradicts {AT}prepare.mode={prep.mode}, whose "
                            f"checkpoints are {kind} experts; use expert_type={kind} or remove it")
    return problems


def implied_values(run: RunConfig) -> dict[str, dict]:
    """Per stage, the values the recipe gives it that the stage's own section left out."""
    fills: dict[str, dict] = {}
    for stage, keys in SHARED.items():
        section = getattr(run, stage)
        fills[stage] = {k: shared_value(run, k) for k in keys if k not in section.model_fields_set}
    connected = links(run)
    if "data" in connected["post_train"] and "data" not in run.post_train.model_fields_set:
        fills["post_train"]["data"] = connected["post_train"]["data"]  # self-generated data: the router's
    if "post_train" in run.stages and "format" not in run.mix.export.model_fields_set:
        export = run.mix.export.model_copy(update={"format": "upcycle"})  # what post_train loads
        export.__pydantic_fields_set__ = set(run.mix.export.model_fields_set)
        fills["mix"]["export"] = export
    kind = "lora" if run.prepare.mode == "lora" else "mlp"
    for stage in ("route", "post_train"):
        if stage == "route" or run.post_train.source == "upit":
            moe = getattr(run, stage).moe
            pool = {"num_experts": run.expand.num_experts, "expert_type": kind}
            moe_fills = {k: v for k, v in pool.items() if k not in moe.model_fields_set}
            if moe_fills:
                filled = moe.model_copy(update=moe_fills)
                filled.__pydantic_fields_set__ = set(moe.model_fields_set)
                fills[stage]["moe"] = filled
    return fills


def stage_configs(run: RunConfig) -> dict[str, object]:
    """Each stage's full config: the recipe's section with the run-wide values and paths filled in."""
    connected = links(run)
    configs = {stage: getattr(run, stage).model_copy(update={**{k: shared_value(run, k) for k in SHARED[stage]},
                                                             **connected[stage]})
               for stage in run.stages}
    if run.report_to is not None:  # logging only: not in any config hash (config_io.LOGGING_KEYS)
        for stage, cfg in configs.items():
            for section in (cfg, getattr(cfg, "ppl", None)):
                train = getattr(section, "train", None)
                if train is not None and "report_to" not in train.model_fields_set:
                    section.__dict__["train"] = train.model_copy(update={"report_to": list(run.report_to)})
    return configs


def check_base(run: RunConfig) -> None:
    """What only the base's config.json can tell, before any stage runs (no weights are read):
    a supported dense model, and a post_train MoE that fits it (granularity, layers, format)."""
    from upcycle.errors import UpcycleError

    if run.base in CONVERTED_ON_FIRST_USE:
        return
    problems, dense = _read_config(run.base)
    moe = export = None
    if "post_train" in run.stages and dense is not None:
        pt = stage_configs(run)["post_train"]
        if pt.source == "upit" or pt.dense in (run.base, f"prepare:{Path(run.out) / 'prepare'}"):
            moe, export = pt.moe, pt.export  # the pool's experts and a fine-tuned base have the base's shape
        elif not pt.dense.startswith("prepare:") and pt.dense not in CONVERTED_ON_FIRST_USE:
            other, other_dense = _read_config(pt.dense, "post_train.dense")
            problems += other
            if other_dense is not None:
                problems += base_problems(other_dense, f"post_train.dense {pt.dense}", pt.moe, pt.export, "post_train.")
    if dense is not None:
        problems += base_problems(dense, f"base {run.base}", moe, export, prefix="post_train.")
    if problems:
        raise UpcycleError(*problems)


def _read_config(name: str, what: str = "base") -> tuple[list[str], dict | None]:
    from upcycle.models import resolve_model
    from upcycle.errors import UpcycleError
    from upcycle.io.model_folder import ModelFolder

    try:
        config = ModelFolder(resolve_model(name), what=what).config
    except UpcycleError as e:
        return e.problems, None
    if not isinstance(config, dict):
        return [f"{what} {name}: config.json is not a mapping of keys"], None
    return [], config


def evaluation_of(stage_cfg) -> dict:
    """A stage's evaluation settings (config.EVAL_KEYS): not in its config hash; a change reruns the
    finished stage, which then only scores (its training is complete)."""
    return {k: getattr(stage_cfg, k) for k in EVAL_KEYS if hasattr(stage_cfg, k)}


def _module(stage: str):
    import importlib
    return importlib.import_module(f"upcycle.stages.{stage}")


def _stage_digest(folder: Path) -> str | None:
    path = folder / MANIFEST
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else None


def results_of(cfgs: dict, out: Path, record: dict) -> dict:
    """The recipe's result: its deliverable (the post-trained model, or the last stage-1 checkpoint
    for the dense recipes) with its suite scores where scored; what it cost per stage (optimizer
    steps, trainable parameters, seconds); and the expert pool's diversity where there is one."""
    if "post_train" in cfgs:
        m = read_manifest(out / "post_train", "post_train")
        result = {"model": str(out / "post_train" / "model"), "scores": m.scores, "average": m.average,
                  "expert_load_entropy": m.expert_load_entropy}
    else:
        last = read_manifest(out / "prepare", "prepare").checkpoints[-1]
        result = {"model": str(out / "prepare" / last.path), "scores": last.scores, "average": last.average}
    cost = {}
    for stage in cfgs:
        data = json_object(out / stage / MANIFEST) or {}
        cost[stage] = {"seconds": (record["stages"].get(stage) or {}).get("seconds"),
                       **{k: data.get(k) for k in ("optimizer_steps", "trainable_parameters") if data.get(k) is not None}}
    result["cost"] = cost
    diversity = {stage: (json_object(out / stage / MANIFEST) or {}).get("diversity") for stage in ("expand", "route")
                 if stage in cfgs}
    if any(diversity.values()):
        result["diversity"] = diversity
    return result


def _inputs_of(cfg: RunConfig) -> list[Path]:
    """Paths a run reads and must never write over: the base folder, a dense model post_train
    upcycles, the data files (not bundled models, not the built-in suite)."""
    names = [cfg.base, *cfg.data.local_files()]
    if "post_train" in cfg.stages and cfg.post_train.dense and not cfg.post_train.dense.startswith(("@", "prepare:")):
        names.append(cfg.post_train.dense)
    return [Path(n) for n in names if not n.startswith("bundled:")]


def _refusals(cfgs: dict, record: dict, out: Path, redo: list[str]) -> list[str]:
    """Stages whose folder holds another config's work: refused before anything is written."""
    problems = []
    for stage, stage_cfg in cfgs.items():
        done = record["stages"].get(stage)
        if stage in redo or done is None or not (out / stage).exists():
            continue
        if done.get("config_hash") != config_hash(stage_cfg, anchor=out):
            problems.append(f"out {out / stage}: made by a different {stage} config; rerun with --redo {stage} "
                            "to replace it (and every stage after it), or choose another out")
            break  # later stages would be redone anyway
    return problems


def run(cfg: RunConfig, progress: bool = True, redo: list[str] | None = None) -> dict:
    """Run the recipe's stages in order; a refused run changes nothing in the folder it refused.
    Under torchrun every rank runs this; rank 0 alone plans, locks and records (upcycle/distributed.py)."""
    from upcycle import distributed as dist

    started = time.perf_counter()
    dist.init()
    cfgs = stage_configs(cfg)
    out = Path(cfg.out)
    record_path = out / RUN_MANIFEST
    with contextlib.ExitStack() as lock:
        record, todo = dist.on_rank_zero_then_wait(lambda: _plan(cfg, cfgs, list(redo or []), lock))
        for stage, stage_cfg in cfgs.items():
            if stage not in todo:
                if progress and dist.is_main():
                    print(f"[{cfg.recipe}] {stage}: done, skipped", flush=True)
                continue
            if progress and dist.is_main():
                print(f"[{cfg.recipe}] {stage}: running", flush=True)
            record["stages"][stage] = {"status": "running", "config_hash": config_hash(stage_cfg, anchor=out)}
            if dist.is_main():
                atomic_write_text(record_path, json.dumps(record, indent=2))
            t0 = time.perf_counter()
            _module(stage).run(stage_cfg, progress=progress)
            dist.barrier()  # every rank's part of the stage is done (rank 0 has written its manifest)
            record["stages"][stage] = {"status": "done", "config_hash": config_hash(stage_cfg, anchor=out),
                                       "evaluation": evaluation_of(stage_cfg),
                                       "manifest_sha256": _stage_digest(out / stage),
                                       "seconds": round(time.perf_counter() - t0, 1)}
            if dist.is_main():
                atomic_write_text(record_path, json.dumps(record, indent=2))

        def finish() -> dict:
            if "mix" in cfgs and "post_train" in cfgs:
                _describe_mixed(cfg, out)
            result = {"recipe": cfg.recipe, "stages": list(cfgs), **results_of(cfgs, out, record),
                      "seconds": time.perf_counter() - started}
            if progress:
                for stage, report in (result.get("diversity") or {}).items():
                    if report and report.get("warning"):
                        print(f"[{cfg.recipe}] {stage}: WARNING: {report['warning']}", flush=True)
            stored = {**result, "model": stored_path(result["model"], out, run_folder=out)} if "model" in result else result
            atomic_write_text(out / "results.json", json.dumps(stored, indent=2, default=str))
            return result

        result = dist.on_rank_zero_then_wait(finish)
    return {"out": str(out), **result}


def _plan(cfg: RunConfig, cfgs: dict, redo: list[str], lock: contextlib.ExitStack) -> tuple[dict, list[str]]:
    """Rank 0, before any stage: check the base and the folder, take the lock (held in `lock` until
    the run ends), clear what --redo names; return the run record and the stages still to run."""
    from upcycle.io.atomic import check_not_an_input, claim_output, make_output_dir, output_lock

    from upcycle.data.check import config_data_problems

    out = Path(cfg.out)
    check_base(cfg)  # the recipe itself was checked when it was built (RunConfig's validators)
    problems = config_data_problems(cfg)  # the data files, and the seed set against their rows
    if problems:
        raise UpcycleError(*problems)
    if scores_suite(cfg.evaluate, cfg.data):
        from upcycle.eval.sandbox import require_isolation
        require_isolation()  # scoring the suite's code domain needs the sandbox: refuse now, not after training
    check_not_an_input(out, _inputs_of(cfg))
    for name in redo:
        if name not in cfgs:
            raise UpcycleError(f"--redo {name}: not a stage of this recipe ({', '.join(cfgs)})")
    lock.enter_context(output_lock(out))
    record_path = out / RUN_MANIFEST
    record = {"recipe": cfg.recipe, "stages": {}}
    if record_path.is_file():
        record = json_object(record_path)
        if record is None or not isinstance(record.get("stages"), dict):
            raise UpcycleError(f"{record_path}: not a run record (hand-edited, or a broken write?); delete it and "
                               "rerun, or choose another out")
    if not redo:
        problems = _refusals(cfgs, record, out, redo)
        if problems:
            raise UpcycleError(*problems)
    make_output_dir(out)
    dump_config(cfg, out / "recipe_resolved.yaml")
    if redo:
        first = min(ORDER.index(r) for r in redo)
        redone = [s for s in cfgs if ORDER.index(s) >= first]
        for stage in redone:  # --redo is --force for the recipe's own stage folders: upcycle's only
            claim_output(out / stage, _inputs_of(cfg), force=True, resumable=True)
        for stage in redone:
            shutil.rmtree(out / stage, ignore_errors=True)
            record["stages"].pop(stage, None)

    def finished(stage: str) -> bool:  # done with this config and these evaluation settings, its manifest unchanged
        done = record["stages"].get(stage) or {}
        return done.get("status") == "done" and done.get("config_hash") == config_hash(cfgs[stage], anchor=out) \
            and done.get("evaluation", evaluation_of(cfgs[stage])) == evaluation_of(cfgs[stage]) \
            and done.get("manifest_sha256") == _stage_digest(out / stage)

    return record, [stage for stage in cfgs if not finished(stage)]


def _describe_mixed(cfg: RunConfig, out: Path) -> None:
    """post_train's card describes an UpIT pool; a mixed recipe's model card names its own stages."""
    from upcycle.export.model_card import METHODS
    from upcycle.export.save import update_card

    model = out / "post_train" / "model"
    card = json.loads((model / "upcycle_provenance.json").read_text())["card"]
    branch = read_manifest(out / "branch", "branch")
    kind = "a LoRA adapter" if cfg.branch.mode == "lora" else "a full fine-tune"
    rows = ", ".join(f"{d.domain}: {d.rows} rows" for d in branch.domains)
    if cfg.branch.data_source == "self_generated":
        seeds = ", ".join(f"{d.domain}: {len(d.seeds or [])}" for d in branch.domains)
        data = (f"each on instruction/response pairs the base model wrote for its domain ({rows}) from a few of its "
                f"real rows as seeds ({seeds}); the router trained on their union")
    else:
        data = f"each on its domain's rows only ({rows})"
    stages = [f"branch: {kind} of the base per domain, {data}, {cfg.branch.train.epochs:g} epochs",
              f"mix: the per-domain experts as the MoE's experts, weights outside them: {cfg.mix.shared}; "
              f"router init: {cfg.mix.router_init}", card["stages"][-1]]
    method = cfg.recipe if cfg.recipe in METHODS else "self_moe" if cfg.branch.data_source == "self_generated" else None
    update_card(model, stages=stages, **({"method": method} if method else {}))
