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
and after, and `routers.safetensors`, which post-training loads.
"""

from __future__ import annotations

import json
import math
import random
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from upcycle.config import RouteConfig, config_hash, dump_config
from upcycle.devices import accelerator, cast_parameters, fp32_master_weights, to_model_device
from upcycle.errors import UpcycleError
from upcycle.io.atomic import atomic_write_text
from upcycle.manifest import MANIFEST, Manifest

CHECKPOINTS = "checkpoints"
ROUTERS = "routers.safetensors"
# Response tokens whose logits are made at once when scoring: chunk x vocab fp32 values (512 MB at
# a 128k vocabulary), whatever the number of samples, their length and the number of experts.
NLL_CHUNK_TOKENS = 1024


# ------------------------------------------------------------------------------ seed data and scoring


def seed_indices(n: int, cfg: RouteConfig) -> list[int]:
    count = cfg.seed_count if cfg.seed_count is not None else round(cfg.seed_fraction * n)
    if count < 1:
        raise UpcycleError(f"seed_fraction: {cfg.seed_fraction} of {n} training samples gives no seed samples; "
                           "raise seed_fraction or set seed_count")
    if count > n:
        raise UpcycleError(f"seed_count: {count} is more than the {n} training samples")
    order = list(range(n))
    random.Random(f"seed-data:{cfg.seed}").shuffle(order)
    return sorted(order[:count])


def _batch(samples, pad_id: int):
    width = max(len(s.input_ids) for s in samples)
    ids = torch.tensor([s.input_ids + [pad_id] * (width - len(s.input_ids)) for s in samples])
    labels = torch.tensor([s.labels + [-100] * (width - len(s.labels)) for s in samples])
    mask = torch.tensor([[1] * len(s.input_ids) + [0] * (width - len(s.input_ids)) for s in samples])
    return ids, labels, mask


def response_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of each row's response tokens: (rows,), from full logits (the
    reference `response_nll_chunked` must match; it holds rows x length x vocab values)."""
    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
    nll = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                          ignore_index=-100, reduction="none").reshape(shift_labels.shape)
    count = (shift_labels != -100).sum(1).clamp_min(1)
    return nll.sum(1) / count


def response_nll_chunked(model, ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                         chunk_tokens: int | None = None) -> torch.Tensor:
    """`response_nll` of the model's logits without making them: the decoder's last hidden states,
    then the LM head on the response positions only, `chunk_tokens` (NLL_CHUNK_TOKENS) at a time, in fp32."""
    chunk_tokens = chunk_tokens or NLL_CHUNK_TOKENS
    hidden = model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, H)
    head = model.get_output_embeddings()
    shift_labels = labels[:, 1:]
    rows, cols = (shift_labels != -100).nonzero(as_tuple=True)
    targets = shift_labels[rows, cols]
    picked = hidden[:, :-1][rows, cols]  # (M, H): the positions that predict a response token
    nll = torch.empty(len(targets), dtype=torch.float32, device=hidden.device)
    for start in range(0, len(targets), chunk_tokens):
        end = start + chunk_tokens
        nll[start:end] = F.cross_entropy(head(picked[start:end]).float(), targets[start:end], reduction="none")
    total = torch.zeros(ids.shape[0], dtype=torch.float32, device=hidden.device).index_add_(0, rows, nll)
    return total / torch.bincount(rows, minlength=ids.shape[0]).clamp_min(1)


@torch.no_grad()
def score_experts(model, samples, num_experts: int, batch_size: int, pad_id: int, progress: bool = False) -> torch.Tensor:
    """(samples, experts) perplexities (a CPU tensor): every expert in one forward per batch (rows
    replicated per expert), the NLL in chunks (`response_nll_chunked`). Under torchrun every rank
    calls it and scores its share of the batches (the same batches as one process: same numbers)."""
    from upcycle import distributed as dist
    from upcycle.moe.model import force_experts

    model.eval()
    bar = tqdm(total=len(dist.shard(range(0, len(samples), batch_size))), desc="scoring", mininterval=0.5,
               disable=not progress)

    def score(start: int) -> torch.Tensor:
        ids, labels, mask = to_model_device(_batch(samples[start:start + batch_size], pad_id), model)
        b = ids.shape[0]
        experts = torch.arange(num_experts, device=ids.device).repeat_interleave(b)  # (N*b,): copy e -> expert e
        with force_experts(model, experts):
            nll = response_nll_chunked(model, ids.repeat(num_experts, 1), labels.repeat(num_experts, 1),
                                       mask.repeat(num_experts, 1))
        bar.update()
        return nll.reshape(num_experts, b).T.cpu()

    out = dist.map_sharded(score, range(0, len(samples), batch_size))
    bar.close()
    return torch.cat(out).exp()


@torch.no_grad()
def score_one_expert(model, samples, expert: int, batch_size: int, pad_id: int) -> torch.Tensor:
    """(samples,) perplexities under one expert alone: the reference the batched scoring must match."""
    from upcycle.moe.model import force_experts

    model.eval()
    out = []
    for i in range(0, len(samples), batch_size):
        ids, labels, mask = to_model_device(_batch(samples[i:i + batch_size], pad_id), model)
        with force_experts(model, torch.full((ids.shape[0],), expert)):
            out.append(response_nll(model(input_ids=ids, attention_mask=mask).logits, labels).cpu())
    return torch.cat(out).exp()


def assign_buckets(ppl: torch.Tensor, mode: str, seed: int) -> torch.Tensor:
    """Owner expert per sample (ties: lowest index, as argmin returns the first of equal minima).

    perplexity  the paper's rule: the expert with the lowest perplexity on the sample.
    relative    the expert whose perplexity on the sample is lowest *relative to its own median*
                over the seed set (log ppl minus the median log ppl): an expert that is better on
                everything no longer owns everything; each sample goes where it stands out most.
    random      uniformly random owners (the ablation).
    """
    if mode == "random":
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, ppl.shape[1], (ppl.shape[0],), generator=g)
    if mode == "relative":
        log_ppl = ppl.double().log()
        return (log_ppl - log_ppl.median(dim=0).values).argmin(dim=1)
    return ppl.argmin(dim=1)


def fill_empty_buckets(owners: torch.Tensor, ppl: torch.Tensor, mode: str) -> tuple[torch.Tensor, list[str]]:
    """The documented fallback for experts that own no sample (see RouteConfig.empty_bucket)."""
    n_experts = ppl.shape[1]
    owners = owners.clone()
    notes = []
    quota = max(1, math.ceil(len(owners) / n_experts / 2))
    for e in range(n_experts):
        if (owners == e).any():
            continue
        if mode == "leave":
            notes.append(f"expert {e} owns no seed sample; its router learns from negatives only (empty_bucket=leave)")
            continue
        ratio = ppl[:, e] / ppl[torch.arange(len(owners)), owners]  # how close e comes to each sample's owner
        taken = []
        for i in ratio.argsort().tolist():
            if len(taken) == quota:
                break
            if (owners == owners[i]).sum() > 1:
                taken.append(i)
                owners[i] = e
        notes.append(f"expert {e} owned no seed sample; it took {len(taken)} samples where its perplexity is "
                     "closest to their owner's (empty_bucket=steal)")
    for note in notes:
        warnings.warn(note)
    return owners, notes


@torch.no_grad()
def owner_share(model, samples, owners: torch.Tensor, top_k: int, pad_id: int, batch_size: int = 16) -> dict:
    """Per layer: the share of bucket tokens whose top-k (and top-1) experts include their owner.
    Under torchrun every rank calls it and counts its share of the batches."""
    from upcycle import distributed as dist
    from upcycle.moe.model import router_logits

    model.eval()

    def count(start: int) -> tuple[list[int], list[int], int]:
        ids, _, mask = to_model_device(_batch(samples[start:start + batch_size], pad_id), model)
        model(input_ids=ids, attention_mask=mask)
        owner_tok = owners[start:start + batch_size].to(ids.device).repeat_interleave(ids.shape[1])
        keep = mask.reshape(-1).bool()
        layer_k, layer_1 = [], []
        for logits in router_logits(model):
            top = torch.topk(logits, top_k, dim=-1).indices
            layer_k.append(((top == owner_tok[:, None]).any(-1) & keep).sum().item())
            layer_1.append(((top[:, 0] == owner_tok) & keep).sum().item())
        return layer_k, layer_1, keep.sum().item()

    counts = dist.map_sharded(count, range(0, len(samples), batch_size))
    hits_k = [sum(col) for col in zip(*(c[0] for c in counts))]
    hits_1 = [sum(col) for col in zip(*(c[1] for c in counts))]
    total = sum(c[2] for c in counts)
    return {"top_k": [h / total for h in hits_k], "top_1": [h / total for h in hits_1], "tokens": total}


# ------------------------------------------------------------------------------ router training


def router_loss(model, inputs: dict, alpha: float, aux_target: str, num_experts: int) -> torch.Tensor:
    """alpha * L_lm + (1 - alpha) * mean over MoE layers of the BCE of sigmoid(router logits) vs the owner.
    `model` may be wrapped (DDP, FSDP): the router logits come from its output, not from its blocks."""
    owner = inputs.pop("owner")  # (B,)
    outputs = model(**inputs)
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    keep = mask.reshape(-1).float() if mask is not None else torch.ones(ids.numel(), device=ids.device)
    owner_tok = owner.to(ids.device).repeat_interleave(ids.shape[1])  # (T,)
    terms = []
    for logits in outputs.router_logits:  # (T, N) per layer
        logits = logits.float()
        if aux_target == "one_hot":
            target = F.one_hot(owner_tok, num_experts).float()
            per_token = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(-1)
        else:
            per_token = -F.logsigmoid(logits.gather(1, owner_tok[:, None]).squeeze(1))
        terms.append((per_token * keep).sum() / keep.sum().clamp_min(1))
    aux = torch.stack(terms).mean()
    return alpha * outputs.loss + (1 - alpha) * aux


def make_trainer_class(loss_fn):
    """An HF Trainer whose loss is `loss_fn(model, inputs)`, stopping with the step named on a NaN."""
    from transformers import Trainer

    class LossTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = loss_fn(model, dict(inputs))
            if model.training and not torch.isfinite(loss):  # an eval NaN is only reported (eval_loss)
                raise UpcycleError(f"loss is {loss.item()} at step {self.state.global_step + 1}; training stopped. "
                                   "The last listed checkpoint is kept: lower train.lr or check the data, then rerun to resume")
            return (loss, {"loss": loss}) if return_outputs else loss

    return LossTrainer


def set_trainable(model, which: str) -> int:
    """Freeze everything except the routers (and the expert weights): returns the trainable count."""
    from upcycle.moe.model import moe_blocks

    for p in model.parameters():
        p.requires_grad_(False)
    for _, block in moe_blocks(model):
        block.router.weight.requires_grad_(True)
        if which in ("routers_and_experts", "experts_and_routers"):
            lora = getattr(block.experts, "lora_A", None)
            params = list(block.experts.lora_A.parameters()) + list(block.experts.lora_B.parameters()) if lora is not None \
                else [block.experts.gate_proj, block.experts.up_proj, block.experts.down_proj]
            for p in params:
                p.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------ the stage


def pool_from_expand(expand_dir: Path) -> dict:
    path = Path(expand_dir) / MANIFEST
    if not path.is_file():
        raise UpcycleError(f"expand {expand_dir}: no {MANIFEST}; run `upcycle expand` first")
    m = json.loads(path.read_text())
    if not m.get("complete"):
        raise UpcycleError(f"expand {expand_dir}: the expand stage has not finished; rerun it to complete")
    return m


def build_pool_model(pool: dict, spec, shared_weights: str, seed: int, routers: Path | None = None,
                     dtype: torch.dtype = torch.float32):
    from upcycle.moe.assemble import assemble_moe

    paths = [Path(e["path"]) for e in pool["experts"]]
    shared = [Path(e["path"]) for e in pool["experts"] if e["origin"] == "checkpoint"]
    spec = spec.model_copy(update={"num_experts": len(paths), "expert_type": "lora" if pool["kind"] == "lora" else "mlp"})
    return assemble_moe(Path(pool["base"]), paths, spec, shared, shared_weights, routers=routers, seed=seed, dtype=dtype)


def run(cfg: RouteConfig, progress: bool = True) -> dict:
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from upcycle.data.build import build_datasets
    from upcycle.data.dataset import Collator, InstructionDataset
    from upcycle.moe.assemble import router_state_dict
    from upcycle.train.checkpoints import clean_unlisted_checkpoints, make_recorder
    from upcycle import distributed as dist
    from upcycle.train.engine import compute_dtype, training_arguments

    started = time.perf_counter()
    if cfg.expand is None or cfg.out is None:
        raise UpcycleError("route: expand= and out= are required")
    dist.init()

    def inputs():  # every rank loads them, after rank 0 has checked them (an error is shown once)
        pool = pool_from_expand(cfg.expand)
        if cfg.moe.top_k > len(pool["experts"]):
            raise UpcycleError(f"moe.top_k: {cfg.moe.top_k} is larger than the pool's {len(pool['experts'])} experts")
        tokenizer = AutoTokenizer.from_pretrained(pool["base"])
        data_spec = cfg.data.model_copy(update={"eval_fraction": 0.0, "packing": False})
        data = build_datasets(data_spec, tokenizer, cfg.seed)
        return pool, tokenizer, data, seed_indices(len(data.train), cfg)

    pool, tokenizer, data, chosen = dist.rank_zero_first(inputs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    samples = [data.train.samples[i] for i in chosen]
    domains = [s.meta.get("domain") for s in samples]

    out = Path(cfg.out)

    def open_folder() -> Manifest:
        m = Manifest.open(out, "route", config_hash(cfg), force=cfg.force, initial={"expand": str(cfg.expand)})
        if not (out / "upcycle_config.yaml").exists():
            dump_config(cfg, out / "upcycle_config.yaml")
        return m

    manifest = dist.on_rank_zero_then_wait(open_folder)
    spec = cfg.moe.model_copy(update={"aux_loss_coef": 0.0, "z_loss_coef": 0.0})  # the route loss is its own
    dtype = compute_dtype(cfg.train)
    model = dist.rank_zero_first(lambda: build_pool_model(pool, spec, cfg.shared_weights, cfg.seed, dtype=dtype)
                                 .to(accelerator()))
    n = len(pool["experts"])

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
            atomic_write_text(out / "perplexity.json", json.dumps({"samples": chosen, "domains": domains, "ppl": ppl.tolist(),
                                                                    "owners": owners.tolist(), "buckets": buckets, "notes": notes}))
            manifest.data.update(owners=owners.tolist(), buckets=buckets, notes=notes, share_before=share_before)
            manifest.save()
            plot_buckets(ppl, owners, domains, out / "buckets.png")

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
        trainer_cls = make_trainer_class(lambda m, inputs: router_loss(m, inputs, cfg.alpha, cfg.aux_target, n))
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
            tmp = out / f".{ROUTERS}.tmp"
            save_file(routers, tmp, metadata={"format": "pt"})
            tmp.replace(out / ROUTERS)
            if cfg.trainable == "routers_and_experts":
                from upcycle.export.save import save_moe
                save_moe(model, out / "moe", format="upcycle", force=True, progress=False)

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


def plot_buckets(ppl: torch.Tensor, owners: torch.Tensor, domains: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = torch.argsort(owners, stable=True)
    rel = ppl.log() - ppl.log().mean(1, keepdim=True)  # per sample: which experts are better than its average
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.5), gridspec_kw={"width_ratios": [1.2, 1]})
    im = a.imshow(rel[order].numpy(), aspect="auto", cmap="coolwarm")
    a.set_xlabel("expert")
    a.set_ylabel("seed sample (grouped by owner)")
    a.set_title("log perplexity minus the sample's mean")
    fig.colorbar(im, ax=a)
    n = ppl.shape[1]
    names = sorted({str(d) for d in domains})
    bottom = [0] * n
    for name in names:
        counts = [sum(1 for d, o in zip(domains, owners.tolist()) if str(d) == name and o == e) for e in range(n)]
        b.bar(range(n), counts, bottom=bottom, label=name)
        bottom = [x + y for x, y in zip(bottom, counts)]
    b.set_xlabel("expert")
    b.set_ylabel("seed samples owned")
    b.set_title("bucket sizes by domain")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_owner_share(before: dict, after: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = range(len(before["top_k"]))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(layers, [100 * x for x in before["top_k"]], "o--", label="before router init (top-k)")
    ax.plot(layers, [100 * x for x in after["top_k"]], "o-", label="after router init (top-k)")
    ax.plot(layers, [100 * x for x in after["top_1"]], "s:", label="after (top-1)")
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("bucket tokens routed to their owner (%)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
