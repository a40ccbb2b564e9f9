"""`branch`: one expert per domain, each trained on that domain's rows alone (Branch-Train-MiX's
"branch, train"; Self-MoE's per-domain LoRA modules on the recipe's own data).

The story: load the training data as every stage does (same eval split, same seed), group its
rows by their `domain`, write each domain's rows to `data/<domain>.jsonl`, and train one copy of
the base on each through the prepare stage (full fine-tuning or a LoRA adapter; each run resumes
on its own). The manifest's `domains` list is the lineage: per expert, its domain, how many rows,
the data file and its hash, and the expert folder (the last checkpoint) that `mix` takes.
The union of the domain files is exactly the training split the later stages use, so each row is
seen train.epochs times in all: the data budget of one stage-1 run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from upcycle.config import BranchConfig, PrepareConfig, config_hash, dump_config
from upcycle.errors import UpcycleError
from upcycle.io.atomic import atomic_write_text
from upcycle.manifest import MANIFEST, Manifest, sha256_files

DATA = "data"
EXPERTS = "experts"


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
    each domain's expert through the prepare stage (upcycle/distributed.py)."""
    from transformers import AutoTokenizer

    from upcycle import distributed as dist
    from upcycle.stages import prepare

    started = time.perf_counter()
    if cfg.base is None or cfg.out is None:
        raise UpcycleError("branch: base= and out= are required")
    dist.init()

    def inputs():  # data errors before anything is written, shown once
        base = prepare.check_base(cfg.base)
        return base, domain_rows(cfg, AutoTokenizer.from_pretrained(base))

    base, groups = dist.rank_zero_first(inputs)
    out = Path(cfg.out)

    def open_folder() -> Manifest:
        m = Manifest.open(out, "branch", config_hash(cfg), force=cfg.force, initial={"base": str(base)})
        if not (out / "upcycle_config.yaml").exists():
            dump_config(cfg, out / "upcycle_config.yaml")
        (out / DATA).mkdir(exist_ok=True)
        for domain, convs in groups.items():
            atomic_write_text(out / DATA / f"{domain}.jsonl",
                              "".join(json.dumps({"messages": c.messages, **c.meta}) + "\n" for c in convs))
        return m

    manifest = dist.on_rank_zero_then_wait(open_folder)
    lineage = []
    for domain, convs in groups.items():
        data_file = out / DATA / f"{domain}.jsonl"
        if progress and dist.is_main():
            print(f"branch: {domain}: {len(convs)} rows", flush=True)
        # The rows are already the training split (eval held out as the other stages hold it out).
        data = cfg.data.model_copy(update={"train": [str(data_file)], "eval": None, "eval_fraction": 0.0, "limit": None})
        stage = PrepareConfig(base=str(base), out=out / EXPERTS / domain, seed=cfg.seed, mode=cfg.mode, lora=cfg.lora,
                              data=data, train=cfg.train, save_every=cfg.train.epochs, evaluate=False, force=cfg.force)
        prepare.run(stage, progress=progress)
        record = json.loads((out / EXPERTS / domain / MANIFEST).read_text())
        lineage.append({"domain": domain, "rows": len(convs), "data": str(data_file), "data_sha256": sha256_files([data_file]),
                        "sources": [c.source for c in convs][:3] + (["..."] if len(convs) > 3 else []),
                        "expert": str((out / EXPERTS / domain / record["checkpoints"][-1]["path"]).resolve()),
                        "mode": cfg.mode, "epochs": cfg.train.epochs})
    manifest.data.update(domains=lineage, kind="lora" if cfg.mode == "lora" else "ffn", complete=True)
    manifest.save()  # rank 0 only
    return {"out": str(out), "experts": [d["expert"] for d in lineage], "domains": lineage,
            "seconds": time.perf_counter() - started}
