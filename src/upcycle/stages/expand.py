"""`upcycle expand`: UpIT stage 2. Grow the stage-1 checkpoints into N experts with a genetic algorithm.

    upcycle expand --prepare runs/prepare --out runs/expand --num-experts 8

The story: the pool starts as the selected checkpoints (default: the second half). While it has
fewer than N experts: find the two most dissimilar experts (cosine of their task vectors over all
MLP parameters, lowest wins), draw alpha ~ U(0, 1), and make a child
    tau_child = DARE(alpha * tau_j) + DARE((1 - alpha) * tau_k)
which joins the pool and may be a parent later. FFN experts merge weights; LoRA experts merge
their deltas dW = (alpha_lora / r) B A, and the child is stored as LoRA factors by SVD (rank and
relative error recorded). Every round is recorded (parents, alpha, p, seed, the similarity
matrix before it) in lineage.json; the final similarity heatmap goes to similarity.png.

Streaming: the similarity (a Gram matrix of task vectors) and each child are computed key by key
(one layer's projection at a time), so memory is the pool size times one tensor.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from upcycle.config import ExpandConfig

from upcycle.config_io import config_hash, dump_config
from upcycle.devices import accelerator
from upcycle.errors import UpcycleError
from upcycle.experts import Key, ffn_name, lora_factors_from_delta, open_expert
from upcycle.io.atomic import atomic_dir, claim_output
from upcycle.io.model_folder import ModelFolder
from upcycle.io.safetensors_io import PlannedTensor, ShardedWriter, release_memory
from upcycle.io.user_files import read_json_object
from upcycle.manifest import Manifest, read_manifest, resolve_path, sha256_files, stored_path
from upcycle.merge import ops
from upcycle.routing.diversity import pool_diversity
from upcycle.eval.plots import plot_similarity
from upcycle.seeding import generator


# ------------------------------------------------------------------------------ the pool


def select_checkpoints(entries: list[dict], cfg: ExpandConfig) -> list[dict]:
    k = len(entries)
    indices = cfg.selected_indices(k)
    bad = [i for i in indices if not 0 <= i < k]
    if bad:
        raise UpcycleError(f"checkpoints: indices {bad} out of range; the prepare stage saved checkpoints 0..{k - 1}")
    return [entries[i] for i in indices]


def check_pool(experts: list, base_reader) -> list[Key]:
    """All experts must have the same keys and shapes, matching the base; the error names the first difference."""
    ref = experts[0]
    for e in experts[1:]:
        if e.kind != ref.kind:
            raise UpcycleError(f"expert {e.path}: a {e.kind} expert in a pool of {ref.kind} experts")
        for key in ref.keys:
            if key not in e.keys:
                raise UpcycleError(f"expert {e.path}: has no tensor for {ffn_name(key)} (present in {ref.path})")
            if e.shape(key) != ref.shape(key):
                raise UpcycleError(f"expert {e.path}: {ffn_name(key)} has shape {list(e.shape(key))}, "
                                   f"{ref.path} has {list(ref.shape(key))}")
        extra = [k for k in e.keys if k not in ref.keys]
        if extra:
            raise UpcycleError(f"expert {e.path}: has {ffn_name(extra[0])} that {ref.path} does not")
    for key in ref.keys:
        name = ffn_name(key)
        if name not in base_reader.tensors:
            raise UpcycleError(f"base: has no tensor {name}, which the experts have; is it the model they were trained from?")
        base_shape = tuple(base_reader.tensors[name].shape)
        if base_shape != ref.shape(key):
            raise UpcycleError(f"base: {name} has shape {list(base_shape)}, the experts have {list(ref.shape(key))}; "
                               "is it the model they were trained from?")
    return ref.keys


def taus(experts: list, key: Key, base: torch.Tensor) -> torch.Tensor:
    """(pool, numel) task vectors of one key, fp32."""
    return torch.stack([e.tau(key, base).reshape(-1) for e in experts])


def lora_gram(factors: list[tuple[torch.Tensor, torch.Tensor, float]]) -> torch.Tensor:
    """<s_i B_i A_i, s_j B_j A_j> for every pair, in factor space (float64): the trace of
    (B_i^T B_j)(A_j A_i^T), r x r products instead of out x in deltas (exact; a LoRA pool's Gram
    matrix and child rows never materialize a delta)."""
    a = [f[0].double() for f in factors]
    b = [f[1].double() * f[2] for f in factors]
    n = len(factors)
    gram = torch.empty(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(i, n):
            gram[i, j] = gram[j, i] = ((b[i].T @ b[j]) * (a[i] @ a[j].T)).sum()
    return gram


def gram_matrices(experts: list, keys: list[Key], base_reader, progress: bool) -> dict[int, torch.Tensor]:
    """Per-layer Gram matrices G_l[i, j] = <tau_i, tau_j> over layer l's MLP parameters (float64)."""
    n = len(experts)
    grams: dict[int, torch.Tensor] = {}
    for key in tqdm(keys, desc="similarity", disable=not progress, mininterval=0.5):
        grams.setdefault(key[0], torch.zeros(n, n, dtype=torch.float64))
        if experts[0].kind == "lora":
            grams[key[0]] += lora_gram([(*e.factors(key), e.scaling) for e in experts])
            continue
        t = taus(experts, key, base_reader.get(ffn_name(key)).float()).double()
        grams[key[0]] += t @ t.T
        del t
        release_memory()
    return grams


def similarity(gram: torch.Tensor, metric: str) -> torch.Tensor:
    """cosine similarity, or (negated) L2 distance: in both, lower means more dissimilar."""
    d = gram.diagonal()
    if metric == "cosine":
        return gram / (d[:, None] * d[None, :]).sqrt().clamp_min(1e-30)
    return -(d[:, None] + d[None, :] - 2 * gram).clamp_min(0).sqrt()


def most_dissimilar(sim: torch.Tensor) -> tuple[int, int]:
    n = sim.shape[0]
    pairs = [(sim[i, j].item(), i, j) for i in range(n) for j in range(i + 1, n)]
    _, i, j = min(pairs)  # ties: lowest indices, deterministically
    return i, j


def random_pair(n: int, gen: torch.Generator) -> tuple[int, int]:
    i, j = torch.randperm(n, generator=gen)[:2].tolist()
    return min(i, j), max(i, j)


# ------------------------------------------------------------------------------ children


@dataclass
class ChildRecord:
    """What a child kept of its merge, summed over every key (layer, projection) as it streams:
    cosine_to_mix is the cosine of the stored child's delta with the plain alpha-mix of its parents'
    deltas (1.0 = no mutation survived); norm_kept is ||stored|| / ||merged||, the part of the merged
    delta that storage kept (below 1 only where storage truncates: delta_svd)."""

    dot: float = 0.0
    stored: float = 0.0
    mix: float = 0.0
    merged: float = 0.0

    def add(self, stored: torch.Tensor, mix: torch.Tensor, merged: torch.Tensor) -> None:
        stored, mix, merged = stored.double(), mix.double(), merged.double()
        self.add_sums(float(stored @ mix), float(stored @ stored), float(mix @ mix), float(merged @ merged))

    def add_sums(self, dot: float, stored: float, mix: float, merged: float) -> None:
        self.dot += dot
        self.stored += stored
        self.mix += mix
        self.merged += merged

    def summary(self) -> dict:
        return {"cosine_to_mix": self.dot / max(math.sqrt(self.stored * self.mix), 1e-300),
                "norm_kept": math.sqrt(self.stored / self.merged) if self.merged > 0 else 1.0}


def lora_child_shape(experts: list, parents: dict[int, tuple[int, int]], cfg: ExpandConfig) -> tuple[int, float]:
    """(rank, scaling) of a LoRA child: the pool's first expert's scaling (every parent's own is folded
    into its B relative to it), and the rank its storage needs (concat: the parents' ranks summed)."""
    if cfg.lora_merge == "concat":
        rank = max(experts[j].rank + experts[k].rank for j, k in parents.values())
    else:
        rank = cfg.lora_child_rank or max(e.rank for e in experts)
    return rank, experts[0].scaling


def write_child(folder: Path, experts: list, keys: list[Key], base_reader, parents: dict[int, tuple[int, int]],
                alpha: float, cfg: ExpandConfig, round_index: int, progress: bool) -> tuple[dict[int, torch.Tensor], dict]:
    """Write one child expert into `folder`; return its Gram row per layer (vs the pool and itself) and
    its record (storage, cosine to the plain mix, norm kept)."""
    kind = experts[0].kind
    n = len(experts)
    rows: dict[int, torch.Tensor] = {}
    errors: list[float] = []
    record = ChildRecord()
    if kind == "ffn":
        planned = [PlannedTensor(ffn_name(k), experts[0].shape(k), experts[0].reader.tensors[ffn_name(k)].dtype) for k in keys]
        weights_file = "model.safetensors"
    else:
        rank, scaling = lora_child_shape(experts, parents, cfg)
        planned = []
        for k in keys:
            out_dim, in_dim = experts[0].shape(k)
            planned += [PlannedTensor(f"{lora_prefix(k)}.lora_A.weight", (rank, in_dim), torch.float32),
                        PlannedTensor(f"{lora_prefix(k)}.lora_B.weight", (out_dim, rank), torch.float32)]
        weights_file = "adapter_model.safetensors"
    writer = ShardedWriter(folder, planned, max_shard_bytes=1 << 62, basename=weights_file.removesuffix(".safetensors"))
    svd_device = accelerator()  # delta_svd children's SVDs: the accelerator's, where there is one (factors come back)
    for key in tqdm(keys, desc=f"child {n}", disable=not progress, mininterval=0.5):
        name = ffn_name(key)
        j, k = parents[key[0]]

        def drop(x: torch.Tensor, *what: str) -> torch.Tensor:
            return ops.dare(x, cfg.drop_p, generator(cfg.seed, "expand", round_index, name, *what), rescale=cfg.dare_rescale)

        if kind == "lora" and cfg.lora_merge != "delta_svd":  # all in factor space: no delta is ever made
            factors = [(*e.factors(key), e.scaling) for e in experts]
            dropped = [(drop(a_, side, "A"), drop(b_, side, "B")) for (a_, b_, _), side in zip((factors[j], factors[k]), "jk")]
            combine = ops.lora_child_concat if cfg.lora_merge == "concat" else ops.lora_child_factors
            a, b = ops.pad_rank(*combine([factors[j], factors[k]], alpha, dropped, scaling), rank)
            writer.write(f"{lora_prefix(key)}.lora_A.weight", a)
            writer.write(f"{lora_prefix(key)}.lora_B.weight", b)
            gram = lora_gram([*factors, (a, b, scaling)])  # (n + 1, n + 1): the pool and the child
            row = gram[n]
            mix_sq = alpha ** 2 * gram[j, j] + 2 * alpha * (1 - alpha) * gram[j, k] + (1 - alpha) ** 2 * gram[k, k]
            record.add_sums(float(alpha * row[j] + (1 - alpha) * row[k]), float(row[n]), float(mix_sq), float(row[n]))
            rows[key[0]] = rows.get(key[0], torch.zeros(n + 1, dtype=torch.float64)) + row
            continue
        base = base_reader.get(name).float()
        pool = taus(experts, key, base)  # (n, numel)
        mix = alpha * pool[j] + (1 - alpha) * pool[k]

        if kind == "ffn" or cfg.lora_merge == "delta_svd":  # DARE on the whole task vectors
            merged = ops.combine([drop(pool[j], "j"), drop(pool[k], "k")], [alpha, 1 - alpha], "sum")
        if kind == "ffn":
            writer.write(name, (base.reshape(-1) + merged).reshape(base.shape))
            stored = merged
        else:
            # delta_svd: (zero-padding past the delta's rank builds CPU tensors in lora_factors_from_delta: CPU there)
            device = svd_device if rank <= min(base.shape) else torch.device("cpu")
            a, b, err = lora_factors_from_delta(merged.reshape(base.shape).to(device), rank)
            a, b = a.cpu(), b.cpu() / scaling
            errors.append(err)
            writer.write(f"{lora_prefix(key)}.lora_A.weight", a)
            writer.write(f"{lora_prefix(key)}.lora_B.weight", b)
            stored = (scaling * (b @ a)).reshape(-1)  # what the child is, after storage
        record.add(stored, mix, merged)
        row = torch.cat([pool, stored[None]]).double() @ stored.double()  # (n + 1,)
        rows[key[0]] = rows.get(key[0], torch.zeros(n + 1, dtype=torch.float64)) + row
        del pool, merged, stored, mix
        release_memory()
    writer.close()
    notes = {"storage": "exact (full MLP weights)"}
    if kind == "lora":
        src = read_json_object(experts[0].path / "adapter_config.json", "peft adapter config")
        src.update(r=rank, lora_alpha=scaling * rank, use_rslora=False, target_modules=sorted({k[1] for k in keys}))
        (folder / "adapter_config.json").write_text(json.dumps(src, indent=2))
        notes = {"storage": {"factors": f"DARE on each parent's A and B, rank {rank}",
                             "concat": f"DARE'd factors of both parents side by side, rank {rank} (exact)",
                             "delta_svd": f"DARE on the full deltas, SVD to rank {rank}"}[cfg.lora_merge]}
        if errors:
            notes.update(svd_relative_error_max=max(errors), svd_relative_error_mean=sum(errors) / len(errors))
    return rows, {"weights": weights_file, **notes, **record.summary()}


def lora_prefix(key: Key) -> str:
    return f"base_model.model.model.layers.{key[0]}.mlp.{key[1]}"


# ------------------------------------------------------------------------------ the stage


def _grams_to_json(grams: dict[int, torch.Tensor]) -> dict:
    return {str(l): g.tolist() for l, g in grams.items()}


def _grams_from_json(data: dict) -> dict[int, torch.Tensor]:
    return {int(l): torch.tensor(g, dtype=torch.float64) for l, g in data.items()}


def run(cfg: ExpandConfig, progress: bool = True) -> dict:
    """Under torchrun rank 0 expands while the other ranks wait (upcycle/distributed.py): each round
    depends on the one before (a child may be the next parent), and the work is streamed from disk."""
    from upcycle import distributed as dist

    dist.init()
    return dist.on_rank_zero_then_wait(lambda: _expand(cfg, progress))


def _expand(cfg: ExpandConfig, progress: bool) -> dict:
    started = time.perf_counter()
    if cfg.prepare is None or cfg.out is None:
        raise UpcycleError("expand: prepare= and out= are required")
    prep = read_manifest(cfg.prepare, "prepare")
    selected = select_checkpoints(prep.checkpoints, cfg)
    problems = cfg.pool_problems(len(selected), at="")  # the same check `upcycle run` makes from the counts alone
    if problems:
        raise UpcycleError(*problems)
    base_path = resolve_path(prep.base, cfg.prepare)
    inputs = [cfg.prepare, base_path, *(Path(cfg.prepare) / c.path for c in selected)]
    claim_output(cfg.out, inputs, cfg.force, resumable=True)
    base_folder = ModelFolder(base_path)
    base_reader = base_folder.reader()
    experts = [open_expert(Path(cfg.prepare) / c.path) for c in selected]
    keys = check_pool(experts, base_reader)

    out = Path(cfg.out)
    manifest = Manifest.open(out, "expand", config_hash(cfg), force=cfg.force, inputs=inputs, initial={
        "base": stored_path(base_path, out), "kind": experts[0].kind, "num_experts": cfg.num_experts,
        "experts": [{"index": i, "origin": "checkpoint", "checkpoint": c.index, "epoch": c.epoch,
                     "path": stored_path(Path(cfg.prepare) / c.path, out), "sha256": c.sha256}
                    for i, c in enumerate(selected)],
        "lineage": []})
    if not (out / "upcycle_config.yaml").exists():
        dump_config(cfg, out / "upcycle_config.yaml")
    records = manifest.data["experts"]
    experts = [open_expert(resolve_path(r["path"], out)) for r in records]  # on resume, children made earlier are in the pool
    if "grams" in manifest.data:
        grams = _grams_from_json(manifest.data["grams"])
    else:
        grams = gram_matrices(experts, keys, base_reader, progress)
        manifest.data["grams"] = _grams_to_json(grams)
        manifest.save()

    while len(experts) < cfg.num_experts:
        round_index = len(manifest.data["lineage"])
        total = sum(grams.values())
        before = similarity(total, cfg.similarity)
        if cfg.parents == "random":
            gen = generator(cfg.seed, "expand", round_index, "parents")
            pair = random_pair(len(experts), gen)
            parents = {l: (random_pair(len(experts), gen) if cfg.per_layer else pair) for l in grams}
        elif cfg.per_layer:
            parents = {l: most_dissimilar(similarity(g, cfg.similarity)) for l, g in grams.items()}
        else:
            pair = most_dissimilar(before)
            parents = {l: pair for l in grams}
        alpha = torch.rand((), generator=generator(cfg.seed, "expand", round_index, "alpha")).item()
        index = len(experts)
        child_dir = out / "experts" / f"child-{index:02d}"
        with atomic_dir(child_dir, force=True) as tmp:
            rows, notes = write_child(tmp, experts, keys, base_reader, parents, alpha, cfg, round_index, progress)
        for l, g in grams.items():  # grow every layer's Gram matrix by the child's row
            grown = torch.zeros(index + 1, index + 1, dtype=torch.float64)
            grown[:index, :index] = g
            grown[index, :] = rows[l]
            grown[:, index] = rows[l]
            grams[l] = grown
        distinct = sorted(set(parents.values()))
        record = {"round": round_index, "child": index, "parents": list(distinct[0]) if len(distinct) == 1 else
                  {str(l): list(p) for l, p in parents.items()}, "alpha": alpha, "drop_p": cfg.drop_p,
                  "seed": cfg.seed, "parent_choice": cfg.parents, "metric": cfg.similarity,
                  "similarity_before": before.tolist(), **notes}
        records.append({"index": index, "origin": "child", "path": stored_path(child_dir, out),
                        "sha256": sha256_files(sorted(child_dir.glob("*.safetensors")))})
        manifest.data["lineage"].append(record)
        manifest.data["grams"] = _grams_to_json(grams)
        manifest.save()
        experts.append(open_expert(child_dir))
        if progress:
            print(f"round {round_index}: child {index} = DARE({alpha:.3f} * tau_{record['parents']}) ...", flush=True)

    final = similarity(sum(grams.values()), cfg.similarity)
    diversity = pool_diversity(similarity(sum(grams.values()), "cosine"), [r["origin"] for r in records])
    manifest.data.update(similarity=final.tolist(), diversity=diversity, complete=True)
    manifest.save()
    if diversity["warning"]:
        warnings.warn(diversity["warning"])
    if progress:
        cos = diversity["pairwise_cosine"]
        print(f"expand: pool task-vector cosine min {cos['min']:.3f} / mean {cos['mean']:.3f} / max {cos['max']:.3f}"
              + (f"; WARNING: {diversity['warning']}" if diversity["warning"] else ""), flush=True)
    (out / "lineage.json").write_text(json.dumps({"experts": records, "rounds": manifest.data["lineage"],
                                                  "final_similarity": final.tolist(), "metric": cfg.similarity}, indent=2))
    plot_similarity(final, records, cfg.similarity, out / "similarity.png")
    return {"out": str(out), "experts": len(records), "children": len(manifest.data["lineage"]),
            "seconds": time.perf_counter() - started}
