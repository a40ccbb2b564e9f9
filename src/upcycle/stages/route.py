"""`upcycle route`: UpIT stage 3. Give each expert the seed samples it is best at, and pre-train the
routers to send those samples' tokens to it.

    upcycle route --config route.yaml        (expand=..., out=..., data=...)

The story: draw the seed set (a fraction of the training data, seeded); score every sample's
perplexity on its response tokens under every expert, all experts in one batched forward (each
copy of the batch is forced to one expert); give each sample to its lowest-perplexity expert
(ties: lowest index); then train the routers (optionally the experts too) with
    loss = alpha * L_lm + (1 - alpha) * BCE(sigmoid(router logits), one-hot of the owner)
at every MoE layer, for every token of the sample. Outputs: the perplexity matrix, buckets and
their domain make-up (JSON + plots), the share of each bucket's tokens routed to its owner before
and after, and `routers.safetensors`, which post-training loads. The pieces it shares with `mix`
(router_init: ppl) live in upcycle/routing/ (buckets, scoring, loss) and upcycle/train/trainer.py.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import torch

from upcycle.config import RouteConfig

from upcycle.config_io import config_hash, dump_config
from upcycle.devices import accelerator, cast_parameters, fp32_master_weights
from upcycle.errors import UpcycleError
from upcycle.io.atomic import atomic_write_file, atomic_write_text, claim_output
from upcycle.manifest import Manifest, stored_path
from upcycle.routing.buckets import assign_buckets, fill_empty_buckets, seed_count, seed_indices
from upcycle.routing.diversity import seed_diversity
from upcycle.eval.plots import plot_buckets, plot_owner_share
from upcycle.routing.loss import router_loss
from upcycle.routing.scoring import owner_share, score_experts
from upcycle.train.trainer import make_trainer_class, set_trainable

CHECKPOINTS = "checkpoints"
ROUTERS = "routers.safetensors"


# ------------------------------------------------------------------------------ the stage


def run(cfg: RouteConfig, progress: bool = True) -> dict:
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from upcycle.data.build import build_datasets
    from upcycle.data.dataset import Collator, InstructionDataset
    from upcycle.moe.assemble import build_pool_model, pool_from_expand, router_state_dict
    from upcycle.train.checkpoints import clean_unlisted_checkpoints, make_recorder
    from upcycle import distributed as dist
    from upcycle.train.engine import compute_dtype, training_arguments

    started = time.perf_counter()
    if cfg.expand is None or cfg.out is None:
        raise UpcycleError("route: expand= and out= are required")
    dist.init()
    out = Path(cfg.out)

    def stage_inputs() -> list:  # what route reads: the pool's folder, base and experts, the data
        pool = pool_from_expand(cfg.expand)
        return [cfg.expand, pool.base, *(e.path for e in pool.experts), *cfg.data.local_files()]

    dist.on_rank_zero_then_wait(lambda: claim_output(out, stage_inputs(), cfg.force, resumable=True))  # before loading

    def inputs():  # every rank loads them, after rank 0 has checked them (an error is shown once)
        pool = pool_from_expand(cfg.expand)
        if cfg.moe.top_k > len(pool.experts):
            raise UpcycleError(f"moe.top_k: {cfg.moe.top_k} is larger than the pool's {len(pool.experts)} experts")
        tokenizer = AutoTokenizer.from_pretrained(pool.base)
        data_spec = cfg.data.model_copy(update={"eval_fraction": 0.0, "packing": False})
        data = build_datasets(data_spec, tokenizer, cfg.seed)
        count = seed_count(len(data.train), cfg.seed_count, cfg.seed_fraction, len(pool.experts), cfg.min_seed_per_expert)
        return pool, tokenizer, data, seed_indices(len(data.train), count, cfg.seed)

    pool, tokenizer, data, chosen = dist.rank_zero_first(inputs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    samples = [data.train.samples[i] for i in chosen]
    domains = [s.meta.get("domain") for s in samples]

    def open_folder() -> Manifest:
        m = Manifest.open(out, "route", config_hash(cfg), force=cfg.force, inputs=stage_inputs(),
                          initial={"expand": stored_path(cfg.expand, out)})
        if not (out / "upcycle_config.yaml").exists():
            dump_config(cfg, out / "upcycle_config.yaml")
        return m

    manifest = dist.on_rank_zero_then_wait(open_folder)
    spec = cfg.moe.model_copy(update={"aux_loss_coef": 0.0, "z_loss_coef": 0.0})  # the route loss is its own
    dtype = compute_dtype(cfg.train)
    model = dist.rank_zero_first(lambda: build_pool_model(pool, spec, cfg.shared_weights, cfg.seed, dtype=dtype)
                                 .to(accelerator()))
    n = len(pool.experts)

    # 1. perplexity of every seed sample under every expert (sharded by batch), then buckets (rank 0)
    if "owners" not in manifest.data:
        ppl = score_experts(model, samples, n, cfg.score_batch_size, pad, progress)

        def buckets_of() -> tuple[torch.Tensor, list[str]]:
            return fill_empty_buckets(assign_buckets(ppl, cfg.buckets, cfg.seed), ppl, cfg.empty_bucket)

        owners, notes = dist.on_rank_zero_then_wait(buckets_of)
        share_before = owner_share(model, samples, owners, spec.top_k, pad)

        def record_buckets() -> None:
            buckets = {str(e): {"size": int((owners == e).sum()), "domains": _count([d for d, o in zip(domains, owners) if o == e])}
                       for e in range(n)}
            diversity = seed_diversity(ppl, owners)
            atomic_write_text(out / "perplexity.json", json.dumps({"samples": chosen, "domains": domains, "ppl": ppl.tolist(),
                                                                    "owners": owners.tolist(), "buckets": buckets, "notes": notes}))
            manifest.data.update(owners=owners.tolist(), buckets=buckets, notes=notes, share_before=share_before,
                                 diversity=diversity)
            manifest.save()
            plot_buckets(ppl, owners, domains, out / "buckets.png")
            if diversity["warning"]:
                warnings.warn(diversity["warning"])
            if progress:
                print(f"route: per-sample perplexity spread (worst / best - 1) median {diversity['ppl_spread']['median']:.3f}, "
                      f"argmin buckets {diversity['argmin_bucket_sizes']} (normalized entropy "
                      f"{diversity['argmin_bucket_entropy']:.2f})" + (f"; WARNING: {diversity['warning']}"
                                                                        if diversity["warning"] else ""), flush=True)

        dist.on_rank_zero_then_wait(record_buckets, share=False)
        manifest.reload()
    owners = torch.tensor(manifest.data["owners"])

    # 2. router pre-training on the buckets (every rank: the Trainer's), the routers written by rank 0
    if not manifest.complete:
        trainable = set_trainable(model, cfg.trainable)
        fp32_master_weights(model)
        if progress and dist.is_main():
            print(f"route: {len(samples)} seed samples, buckets {[b['size'] for b in manifest.data['buckets'].values()]}, "
                  f"training {trainable} parameters ({cfg.trainable})", flush=True)
        dataset = InstructionDataset([{"input_ids": s.input_ids, "labels": s.labels, "owner": int(o)}
                                      for s, o in zip(samples, owners.tolist())])
        args = training_arguments(cfg.train, out / CHECKPOINTS, cfg.seed, moe=True, progress=progress)
        trainer_cls = make_trainer_class(cfg.train, lambda m, inputs: router_loss(m, inputs, cfg.alpha, cfg.aux_target, n))
        # One checkpoint per epoch (to resume from); the routers themselves are saved at the end.
        every = 1.0 if float(cfg.train.epochs).is_integer() else cfg.train.epochs
        recorder = make_recorder(manifest, cfg.train.epochs, every, "last", has_eval=False)
        trainer = trainer_cls(model=model, args=args, train_dataset=dataset, data_collator=Collator(pad), callbacks=[recorder])
        if not progress:
            from transformers.trainer_callback import PrinterCallback
            trainer.remove_callback(PrinterCallback)
        resume = dist.on_rank_zero_then_wait(lambda: clean_unlisted_checkpoints(manifest, CHECKPOINTS))
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        routers = router_state_dict(model)  # the fp32 master weights
        cast_parameters(model, dtype)

        def write_routers() -> None:
            atomic_write_file(out / ROUTERS, lambda tmp: save_file(routers, tmp, metadata={"format": "pt"}))
            if cfg.trainable == "routers_and_experts":
                from upcycle.export.save import MODEL_DIR, save_moe
                save_moe(model, out / MODEL_DIR, format="upcycle", force=True, progress=False)

        dist.on_rank_zero_then_wait(write_routers, share=False)
        share_after = owner_share(model, samples, owners, spec.top_k, pad)

        def finish() -> None:
            manifest.data["share_after"] = share_after
            manifest.data["complete"] = True
            manifest.save()
            plot_owner_share(manifest.data["share_before"], manifest.data["share_after"], out / "owner_share.png")

        dist.on_rank_zero_then_wait(finish, share=False)
        manifest.reload()
    return {"out": str(out), "seed_samples": len(samples), "buckets": manifest.data["buckets"],
            "share_before": manifest.data["share_before"], "share_after": manifest.data.get("share_after"),
            "seconds": time.perf_counter() - started}


def _count(items: list) -> dict:
    out: dict = {}
    for x in items:
        out[str(x)] = out.get(str(x), 0) + 1
    return out
