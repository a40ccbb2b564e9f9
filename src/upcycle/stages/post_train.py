"""`upcycle post-train`: UpIT stage 4, and the training step of every upcycling baseline.

    upcycle post-train --config post_train.yaml

The story: build the MoE (UpIT: experts from expand, routers from route, the other weights as in
stage 1; or any dense model upcycled with an initializer: copy, virtual groups, drop, LoRA
experts); train it through the HF Trainer with LM + load-balancing loss, checkpointing every
`save_every` epochs (a kill resumes from the last listed checkpoint; a NaN loss stops with the
step named); export the result as a stock transformers MoE (or the own format), and score it on
the built-in suite.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from upcycle.config import PostTrainConfig, scores_suite

from upcycle.config_io import config_hash, dump_config
from upcycle.errors import UpcycleError
from upcycle.export.save import MODEL_DIR
from upcycle.io.atomic import claim_output
from upcycle.manifest import Manifest, json_object, read_manifest, resolve_path

CHECKPOINTS = "checkpoints"
MODEL = MODEL_DIR


def dense_source(spec: str) -> tuple[Path, Path]:
    """(model folder, tokenizer folder); `prepare:FOLDER` means that prepare run's final model (a LoRA
    adapter merged into its base), whose tokenizer is the base's."""
    from upcycle.models import resolve_model

    if not spec.startswith("prepare:"):
        folder = resolve_model(spec)
        return folder, folder
    folder = Path(spec.removeprefix("prepare:"))
    try:
        manifest = read_manifest(folder, "prepare")
    except UpcycleError as e:
        raise UpcycleError(f"dense {spec}: not a finished prepare run", *e.problems) from None
    last = folder / manifest.checkpoints[-1].path
    base = resolve_path(manifest.base, folder)
    if manifest.mode == "full":
        return last, base
    merged = folder / "final_merged"
    if not (merged / "config.json").is_file():  # merge the final adapter into the base once
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from upcycle.io.atomic import atomic_dir
        dense = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        model = PeftModel.from_pretrained(dense, last).merge_and_unload()
        with atomic_dir(merged, force=True) as tmp:
            model.save_pretrained(tmp)
            AutoTokenizer.from_pretrained(base).save_pretrained(tmp)
    return merged, merged


def stage_inputs(cfg: PostTrainConfig) -> list:
    """What this stage reads, which its out folder may never be, hold or lie inside."""
    inputs: list = cfg.data.local_files()
    if cfg.source == "upit" and cfg.expand is not None:
        from upcycle.moe.assemble import pool_from_expand

        pool = pool_from_expand(cfg.expand)
        inputs += [cfg.expand, cfg.route, pool.base, *(e.path for e in pool.experts)]
    elif cfg.dense is not None and cfg.dense.startswith("prepare:"):
        folder = Path(cfg.dense.removeprefix("prepare:"))
        inputs.append(folder)
        if (folder / "manifest.json").is_file():  # its base too (an unfinished run is refused by dense_source)
            inputs.append(resolve_path(json_object(folder / "manifest.json").get("base", folder), folder))
    elif cfg.dense is not None and not cfg.dense.startswith("bundled:"):
        inputs.append(cfg.dense)
    return inputs


def build_model(cfg: PostTrainConfig):
    """(model, tokenizer source folder) for the configured source, its weights in train.precision's dtype."""
    from upcycle.devices import cast_parameters
    from upcycle.train.engine import compute_dtype

    dtype = compute_dtype(cfg.train)
    if cfg.source == "upit":
        from upcycle.moe.assemble import build_pool_model, pool_from_expand

        if cfg.expand is None:
            raise UpcycleError("post_train: source upit needs expand= (the expand stage's folder)")
        pool = pool_from_expand(cfg.expand)
        routers = None
        if cfg.route is not None:
            read_manifest(cfg.route, ("route", "mix"))  # refuses an unfinished stage (mix also writes routers)
            if (Path(cfg.route) / MODEL / "upcycle_moe.json").is_file():  # routers and experts were trained
                from upcycle.export.load import load_moe
                model = load_moe(Path(cfg.route) / MODEL)
                cast_parameters(model, dtype)
                return model, Path(pool.base)
            routers = Path(cfg.route) / "routers.safetensors"
        return build_pool_model(pool, cfg.moe, cfg.shared_weights, cfg.seed, routers=routers, dtype=dtype), Path(pool.base)
    if cfg.dense is None:
        raise UpcycleError("post_train: source upcycle needs dense= (a model folder or prepare:FOLDER)")
    from transformers import AutoModelForCausalLM

    from upcycle.moe.model import upcycle_model

    folder, tokenizer_folder = dense_source(cfg.dense)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True)
    return upcycle_model(model, cfg.moe, cfg.init, cfg.seed), tokenizer_folder


def exported_model(cfg: PostTrainConfig, folder: Path):
    """The post-trained model as this stage exported it, for a rerun that only evaluates: the model
    `build_model` assembles is the untrained one (scoring it once reported 53/45/59/45 for a
    64/76/55/57 model on SmolLM2)."""
    from upcycle.export.load import load_moe
    from upcycle.train.engine import compute_dtype

    return load_moe(folder, dtype=compute_dtype(cfg.train))  # compact adapters: onto the base they name


def card_info(cfg: PostTrainConfig, trainable: str) -> dict:
    """What the exported model's card says about how it was made (see export/model_card.py)."""
    epochs = f"{cfg.train.epochs:g} epoch{'' if cfg.train.epochs == 1 else 's'}"
    train = f"post-train: {epochs}, LM + load-balancing loss (coefficient {cfg.moe.aux_loss_coef:g}), trainable: {trainable}"
    from upcycle.data.instructions import describe_source

    info = {"tool": "upcycle post-train", "data": [describe_source(d) for d in cfg.data.train]}
    if cfg.source == "upit":
        from upcycle.moe.assemble import pool_from_expand

        pool = pool_from_expand(cfg.expand)
        kind = "LoRA" if pool.kind == "lora" else "full"
        checkpoints = sum(e.origin == "checkpoint" for e in pool.experts)
        return {**info, "base": pool.base, "method": "upit", "stages": [
            f"prepare: {kind} instruction tuning of the dense base; its checkpoints become experts",
            f"expand: {len(pool.experts)} experts: {checkpoints} checkpoints + "
            f"{len(pool.experts) - checkpoints} DARE-merged children",
            "route: routers initialized from perplexity buckets of seed data" if cfg.route is not None
            else "route: skipped (random routers)", train]}
    stages = [f"upcycle: {cfg.moe.num_experts} experts from the dense MLP, init {cfg.init.method}", train]
    if cfg.dense.startswith("prepare:"):
        folder = Path(cfg.dense.removeprefix("prepare:"))
        base = str(resolve_path(read_manifest(folder, "prepare").base, folder))
        stages.insert(0, "prepare: dense instruction tuning; its final checkpoint is upcycled")
    else:
        base = str(dense_source(cfg.dense)[0])
    return {**info, "base": base, "init": cfg.init.model_dump(mode="json"), "stages": stages}


def resolve_trainable(cfg: PostTrainConfig, model) -> str:
    if cfg.trainable != "auto":
        return cfg.trainable
    return "experts_and_routers" if model.upcycle_spec.expert_type == "lora" else "all"


def apply_trainable(model, which: str) -> int:
    if which == "all":
        for p in model.parameters():
            p.requires_grad_(True)
        from upcycle.moe.model import moe_blocks
        for _, block in moe_blocks(model):  # LoRA experts' shared dense MLP stays frozen even then
            if hasattr(block.experts, "lora_A"):
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    getattr(block.experts, proj).requires_grad_(False)
        return sum(p.numel() for p in model.parameters() if p.requires_grad)
    from upcycle.train.trainer import set_trainable
    return set_trainable(model, which)


@torch.no_grad()
def expert_load_entropy(model, samples, pad_id: int, batch_size: int = 16) -> dict:
    """Entropy (nats) of the share of top-k assignments per expert, per MoE layer, over `samples`."""
    from upcycle.devices import to_model_device
    from upcycle.moe.losses import expert_load
    from upcycle.moe.model import router_logits
    from upcycle.train.trainer import pad_batch

    model.eval()
    k = model.upcycle_spec.top_k
    counts = None
    for i in range(0, len(samples), batch_size):
        ids, _, mask = to_model_device(pad_batch(samples[i:i + batch_size], pad_id), model)
        model(input_ids=ids, attention_mask=mask)
        keep = mask.reshape(-1).bool()
        layer = [expert_load(l[keep], k) * keep.sum() for l in router_logits(model)]
        counts = layer if counts is None else [a + b for a, b in zip(counts, layer)]
    entropies = []
    for c in counts:
        p = c / c.sum()
        entropies.append(float(-(p[p > 0] * p[p > 0].log()).sum()))
    return {"per_layer": entropies, "mean": sum(entropies) / len(entropies),
            "max": math.log(counts[0].numel())}


def run(cfg: PostTrainConfig, progress: bool = True, callbacks: list | None = None) -> dict:
    """Train and export; `callbacks` are extra transformers TrainerCallbacks (logging, custom stops).
    Under torchrun every rank trains; rank 0 owns the folder, exports and scores (upcycle/distributed.py)."""
    from transformers import AutoTokenizer

    from upcycle import distributed as dist
    from upcycle.data.build import build_datasets
    from upcycle.data.dataset import Collator
    from upcycle.devices import accelerator, cast_parameters, fp32_master_weights
    from upcycle.export.save import save_moe, update_card
    from upcycle.train.checkpoints import clean_unlisted_checkpoints, make_recorder
    from upcycle.train.engine import compute_dtype, training_arguments
    from upcycle.train.trainer import make_trainer_class

    started = time.perf_counter()
    if cfg.out is None:
        raise UpcycleError("post_train: out= is required")
    dist.init()
    out = Path(cfg.out)
    dist.on_rank_zero_then_wait(lambda: claim_output(out, stage_inputs(cfg), cfg.force, resumable=True))  # before loading

    def inputs():  # every rank loads them, after rank 0 has checked them (an error is shown once)
        model, token_source = build_model(cfg)
        tokenizer = AutoTokenizer.from_pretrained(token_source)
        return model, token_source, tokenizer, build_datasets(cfg.data, tokenizer, cfg.seed)

    model, token_source, tokenizer, data = dist.rank_zero_first(inputs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def open_folder() -> Manifest:
        m = Manifest.open(out, "post_train", config_hash(cfg), force=cfg.force, inputs=stage_inputs(cfg),
                          initial={"source": cfg.source})
        if not (out / "upcycle_config.yaml").exists():
            dump_config(cfg, out / "upcycle_config.yaml")
        return m

    manifest = dist.on_rank_zero_then_wait(open_folder)
    # The spec's training-time settings (aux coefficient, jitter, z-loss) come from this stage's config.
    model.upcycle_spec = model.upcycle_spec.model_copy(update={
        k: getattr(cfg.moe, k) for k in ("aux_loss_coef", "aux_loss_scope", "z_loss_coef", "router_jitter")})
    from upcycle.moe.model import moe_blocks
    for _, block in moe_blocks(model):
        block.router.jitter = cfg.moe.router_jitter

    trained = not manifest.complete
    if trained:
        which = resolve_trainable(cfg, model)
        count = apply_trainable(model, which)
        fp32_master_weights(model)
        if progress and dist.is_main():
            print(f"post-train: {data.summary()}\n  training {count} parameters ({which})", flush=True)
        args = training_arguments(cfg.train, out / CHECKPOINTS, cfg.seed, packing=cfg.data.packing, moe=True,
                                  progress=progress)
        trainer_cls = make_trainer_class(cfg.train, lambda m, inputs: m(**inputs).loss)
        recorder = make_recorder(manifest, cfg.train.epochs, cfg.save_every, "last", has_eval=data.eval is not None)
        trainer = trainer_cls(model=model, args=args, train_dataset=data.train, eval_dataset=data.eval,
                              data_collator=Collator(pad), callbacks=[recorder, *(callbacks or [])])
        if not progress:
            from transformers.trainer_callback import PrinterCallback
            trainer.remove_callback(PrinterCallback)
        resume = dist.on_rank_zero_then_wait(lambda: clean_unlisted_checkpoints(manifest, CHECKPOINTS))
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        cast_parameters(model, compute_dtype(cfg.train))  # fp32 master copies back: export keeps the precision

        def export() -> None:  # rank 0 exports (the other ranks hold the same weights: DDP)
            summary = save_moe(model, out / MODEL, format=cfg.export.format, dtype=cfg.export.dtype,
                               max_shard_size=cfg.export.max_shard_size, lora_storage=cfg.export.lora_storage,
                               untie_embeddings=cfg.export.untie_embeddings,
                               force=True, tokenizer=tokenizer, base_path=token_source, progress=False,
                               card=card_info(cfg, which))
            manifest.data["export"] = {k: summary[k] for k in ("format", "files", "parameters")}
            eval_samples = (data.eval.samples if data.eval is not None else data.train.samples)[:256]
            if isinstance(eval_samples[0], dict):  # packed training blocks: use unpacked eval samples only
                eval_samples = data.eval.samples[:256] if data.eval is not None else []
            if eval_samples:
                manifest.data["expert_load_entropy"] = expert_load_entropy(model, eval_samples, pad)
            manifest.data["complete"] = True
            manifest.save()

        dist.on_rank_zero_then_wait(export, share=False)
        manifest.reload()
    from upcycle.eval.checkpoints import eval_signature

    signature = eval_signature(cfg.data.suite, cfg.eval_max_items)
    if scores_suite(cfg.evaluate, cfg.data) and manifest.data.get("scored_with") != signature:  # not scored yet, or with other settings
        from upcycle.eval.checkpoints import suite_test_items
        from upcycle.eval.suite_eval import evaluate_items

        def evaluate() -> None:  # rank 0 (generation batches as in one process); the others wait
            scored = model if trained else exported_model(cfg, out / MODEL)
            scored.to(accelerator())  # a rerun that only evaluates has not been placed by the Trainer
            result = evaluate_items(scored, tokenizer, suite_test_items(cfg.data.suite, cfg.eval_max_items),
                                    progress=progress)
            manifest.data.update(scores=result["scores"], average=result["average"], scored_with=signature)
            manifest.save()
            update_card(out / MODEL, scores={**result["scores"], "average": result["average"]})
            (out / "suite_outputs.json").write_text(json.dumps(result["outputs"], indent=1))

        dist.on_rank_zero_then_wait(evaluate, share=False)
        manifest.reload()
    return {"out": str(out), "model": str(out / MODEL), **{k: manifest.data.get(k) for k in
            ("export", "scores", "average", "expert_load_entropy")}, "seconds": time.perf_counter() - started}
