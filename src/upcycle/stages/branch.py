"""`branch`: one expert per domain, each trained on that domain's rows alone (Branch-Train-MiX's
"branch, train"; Self-MoE's per-domain LoRA modules on the recipe's own data).

The story: load the training data as every stage does (same eval split, same seed), group its
rows by their `domain`, write each domain's rows to `data/<domain>.jsonl`, and train one copy of
the base on each through the prepare stage (full fine-tuning or a LoRA adapter; each run resumes
on its own). The manifest's `domains` list is the lineage: per expert, its domain, how many rows,
the data file and its hash, and the expert folder (the last checkpoint) that `mix` takes (both
relative to the branch folder: upcycle/manifest.py).
The union of the domain files is exactly the training split the later stages use, so each row is
seen train.epochs times in all: the data budget of one stage-1 run.

`data_source: self_generated` is Self-MoE's self-specialization (upcycle/data/self_generate.py):
`seed_per_domain` seeds are drawn (seeded) from each domain's training rows (`data/<domain>.seeds.jsonl`),
the base writes `data/<domain>.generated.jsonl` from them on rank 0 while the other ranks wait, and each
expert trains on that file instead of the domain's rows. Each domain's file is listed in the manifest (`generated`: seeds, counts, drops, hash)
once it is written whole, so a rerun after a kill regenerates only the domains not listed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from upcycle.config import BranchConfig, PrepareConfig

from upcycle.config_io import config_hash, dump_config
from upcycle.data import self_generate as sg
from upcycle.errors import UpcycleError
from upcycle.io.atomic import atomic_write_text, claim_output
from upcycle.manifest import Manifest, read_manifest, resolve_path, sha256_files, stored_path

DATA = "data"
EXPERTS = "experts"
GENERATED_UNION = "generated.jsonl"  # every domain's generated pairs: what post_train's router trains on


def generated_union(out: Path) -> Path:
    """The union of the self-generated data under a branch folder (the paper trains the router on it)."""
    return Path(out) / DATA / GENERATED_UNION


def domain_rows(cfg: BranchConfig, tokenizer) -> dict[str, list]:
    """The training split's conversations by domain, in the order of `cfg.domains` (default: sorted)."""
    from upcycle.data.build import build_datasets

    convs = build_datasets(cfg.data, tokenizer, cfg.seed).train_conversations
    by: dict[str, list] = {}
    for c in convs:
        if c.domain is None:
            raise UpcycleError(f"data: row {c.source} has no `domain`; branch trains one expert per domain, so every "
                               "row needs one (add \"domain\": ... to each row)")
        by.setdefault(str(c.domain), []).append(c)
    names = cfg.domains if cfg.domains is not None else sorted(by)
    empty = [d for d in names if not by.get(d)]
    if empty:
        raise UpcycleError(f"branch.domains: {empty[0]!r} has no rows in the training data (it has "
                           f"{', '.join(f'{d}: {len(v)}' for d, v in sorted(by.items()))}); remove it or add its rows")
    if len(names) < 2:
        raise UpcycleError(f"branch.domains: {names} is one domain; an MoE of domain experts needs at least two")
    return {d: by[d] for d in names}


def run(cfg: BranchConfig, progress: bool = True) -> dict:
    """Under torchrun rank 0 checks the data and writes the domain files; every rank then trains
    each domain's expert through the prepare stage (upcycle/distributed.py).

    Running `prepare.run` once per domain is orchestration, as pipeline.py runs stages: branch
    imports no helper of the prepare stage (the base check is upcycle/train/dense.py's)."""
    from transformers import AutoTokenizer

    from upcycle import distributed as dist
    from upcycle.stages import prepare  # only its run(): one prepare run per domain
    from upcycle.train.dense import check_base

    started = time.perf_counter()
    if cfg.base is None or cfg.out is None:
        raise UpcycleError("branch: base= and out= are required")
    dist.init()
    out = Path(cfg.out)

    def inputs():  # data errors before anything is written, shown once
        base = check_base(cfg.base).path
        claim_output(out, [base, *cfg.data.local_files()], cfg.force, resumable=True)
        groups = domain_rows(cfg, AutoTokenizer.from_pretrained(base))
        seeds = {d: sg.pick_seeds(convs, cfg.seed_per_domain, cfg.seed, d) for d, convs in groups.items()} \
            if cfg.data_source == "self_generated" else {}
        return base, groups, seeds

    base, groups, seeds = dist.rank_zero_first(inputs)

    def open_folder() -> Manifest:
        m = Manifest.open(out, "branch", config_hash(cfg), force=cfg.force, inputs=[base, *cfg.data.local_files()],
                          initial={"base": stored_path(base, out)})
        if not (out / "upcycle_config.yaml").exists():
            dump_config(cfg, out / "upcycle_config.yaml")
        (out / DATA).mkdir(exist_ok=True)
        for domain, convs in groups.items():
            if cfg.data_source == "self_generated":  # only the seeds: no other real row reaches the base or the expert
                by_source = {c.source: c for c in convs}
                convs = [by_source[s.source] for s in seeds[domain]]
                name = f"{domain}.seeds.jsonl"
            else:
                name = f"{domain}.jsonl"
            atomic_write_text(out / DATA / name, "".join(json.dumps({"messages": c.messages, **c.meta}) + "\n" for c in convs))
        return m

    manifest = dist.on_rank_zero_then_wait(open_folder)
    generated = dist.on_rank_zero_then_wait(
        lambda: self_generate(cfg, base, seeds, {d: len(c) for d, c in groups.items()}, manifest, progress)) \
        if cfg.data_source == "self_generated" else {}
    lineage = []
    for domain, convs in groups.items():
        data_file = out / DATA / (f"{domain}.generated.jsonl" if generated else f"{domain}.jsonl")
        rows = generated[domain]["kept"] if generated else len(convs)  # what the expert trains on
        if progress and dist.is_main():
            print(f"branch: {domain}: {rows} {'generated ' if generated else ''}rows", flush=True)
        # The rows are already the training split (eval held out as the other stages hold it out).
        data = cfg.data.model_copy(update={"train": [str(data_file)], "eval": None, "eval_fraction": 0.0, "limit": None})
        stage = PrepareConfig(base=str(base), out=out / EXPERTS / domain, seed=cfg.seed, mode=cfg.mode, lora=cfg.lora,
                              data=data, train=cfg.train, save_every=cfg.train.epochs, evaluate=False, force=cfg.force)
        prepare.run(stage, progress=progress, anchor=out.parent)  # the branch's anchor: its data lies beside the expert
        record = read_manifest(out / EXPERTS / domain, "prepare")
        data_name = stored_path(data_file, out)
        sources = [f"{data_name}:{i}" for i in range(1, rows + 1)] if generated else [c.source for c in convs]
        entry = {"domain": domain, "rows": rows, "data": data_name, "data_sha256": sha256_files([data_file]),
                 "sources": sources[:3] + (["..."] if rows > 3 else []),
                 "expert": stored_path(out / EXPERTS / domain / record.checkpoints[-1].path, out),
                 "mode": cfg.mode, "epochs": cfg.train.epochs, "data_source": cfg.data_source}
        if generated:  # the only real rows behind this expert
            entry["seeds"] = generated[domain]["seeds"]
        lineage.append(entry)
    manifest.data.update(domains=lineage, kind="lora" if cfg.mode == "lora" else "ffn", complete=True)
    manifest.save()  # rank 0 only
    return {"out": str(out), "experts": [str(resolve_path(d["expert"], out)) for d in lineage], "domains": lineage,
            "seconds": time.perf_counter() - started}


def self_generate(cfg: BranchConfig, base: Path, seeds: dict[str, list], counts: dict[str, int], manifest: Manifest,
                  progress: bool = True) -> dict[str, dict]:
    """Rank 0: each domain's generated file, written whole and then listed in the manifest (`generated`);
    a domain already listed with a file of the listed hash is kept as it is (a rerun resumes here).
    Returns the listing (small: it is sent to the other ranks)."""
    listed = manifest.data.setdefault("generated", {})
    model = tokenizer = None
    for domain, picked in seeds.items():
        asked = cfg.generate_per_domain or counts[domain]
        path = Path(manifest.folder) / DATA / f"{domain}.generated.jsonl"
        done = listed.get(domain)
        if done and path.is_file() and sha256_files([path]) == done["sha256"]:
            if progress:
                print(f"branch: {domain}: {done['kept']} generated rows already written", flush=True)
            continue
        if model is None:
            model, tokenizer = load_generator(base, cfg)
        if progress:
            print(f"branch: {domain}: generating {asked} pairs from {len(picked)} seeds", flush=True)
        rows, report = sg.generate_domain(model, tokenizer, domain, picked, asked,
                                          sg.Settings.of(cfg), cfg.seed)
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
        seeds_file = Path(manifest.folder) / DATA / f"{domain}.seeds.jsonl"
        listed[domain] = {"file": stored_path(path, manifest.folder), "sha256": sha256_files([path]), "asked": asked,
                          **report.as_dict(), "seeds": [s.source for s in picked],
                          "seeds_file": stored_path(seeds_file, manifest.folder), "seeds_sha256": sha256_files([seeds_file]),
                          "generator": {"base": stored_path(base, manifest.folder), "shots": cfg.shots, "max_new_tokens": cfg.max_new_tokens,
                                        "temperature": cfg.temperature, "top_p": cfg.top_p,
                                        "batch_size": cfg.generate_batch_size, "seed": cfg.seed}}
        if report.kept < asked and progress:
            print(f"branch: {domain}: kept {report.kept} of {asked} pairs after {report.prompts} "
                  f"prompts (dropped: {dict(report.dropped)})", flush=True)
        manifest.save()
    union = generated_union(manifest.folder)
    files = [resolve_path(listed[d]["file"], manifest.folder) for d in seeds]
    atomic_write_text(union, "".join(f.read_text(encoding="utf-8") for f in files))
    manifest.data["generated_union"] = {"file": stored_path(union, manifest.folder), "sha256": sha256_files([union]),
                                        "domains": list(seeds)}
    manifest.save()
    if model is not None:
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return listed


def load_generator(base: Path, cfg: BranchConfig):
    """The base model that writes the data: read-only, so held in the compute dtype on this process's accelerator."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from upcycle.devices import accelerator
    from upcycle.train.engine import compute_dtype

    model = AutoModelForCausalLM.from_pretrained(base, dtype=compute_dtype(cfg.train), use_safetensors=True)
    model.to(accelerator()).eval()
    return model, AutoTokenizer.from_pretrained(base)
