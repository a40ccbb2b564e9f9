"""How different UpIT's experts are, measured where the method needs it, as plain tensor math.

UpIT lives on experts that differ: checkpoints that are near copies give children that are near
copies, seed samples that every expert scores alike give buckets that carry no information, and a
bucket rule that hands almost every sample to one expert trains routers that send everything there.
Three measures, reported by expand, route and the run summary, each with a plain warning when it
says the pool is degenerate:

    pairwise task-vector cosine   over the pool (expand): 1.0 means copies
    perplexity spread             per seed sample, worst expert's perplexity over the best one's,
                                  minus 1 (route): 0 means no expert is better at anything
    bucket entropy                of the argmin bucket sizes, divided by log N (route): 1 is even,
                                  0 is one expert owning every sample

The thresholds below are where a pool stops being one UpIT can work with (README, "Diversity of UpIT's expert pool").
"""

from __future__ import annotations

import math

import torch

POOL_COSINE_MAX = 0.99
"""Mean pairwise task-vector cosine of the pool's checkpoints above which they are near copies
(SmolLM2 with stage 1 annealed to 0: the two second-half checkpoints at 0.9997)."""
PPL_SPREAD_MIN = 0.05
"""Median per-sample spread (worst / best perplexity - 1) below which the experts are
indistinguishable on the seed data."""
BUCKET_ENTROPY_MIN = 0.5
"""Normalized entropy of the argmin bucket sizes below which one or two experts own most samples."""


def _stats(values: list[float]) -> dict:
    return {"min": min(values), "mean": sum(values) / len(values), "max": max(values)} if values else {}


def pool_diversity(cosine: torch.Tensor, origins: list[str]) -> dict:
    """Pairwise cosine of the pool's task vectors (`cosine`: (n, n)); `origins`: checkpoint / child."""
    n = cosine.shape[0]
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    everyone = [float(cosine[i, j]) for i, j in pairs]
    checkpoints = [float(cosine[i, j]) for i, j in pairs if origins[i] == origins[j] == "checkpoint"]
    report = {"pairwise_cosine": _stats(everyone), "checkpoint_cosine": _stats(checkpoints)}
    # Judged on the checkpoints: a child's DARE noise lowers its cosine to its parents without making
    # the pool any more diverse than the checkpoints it was bred from.
    mean = (report["checkpoint_cosine"] or report["pairwise_cosine"]).get("mean")
    report["degenerate"] = mean is not None and mean > POOL_COSINE_MAX
    report["warning"] = (f"the expert pool is degenerate: mean pairwise task-vector cosine of its checkpoints {mean:.4f} "
                         f"> {POOL_COSINE_MAX} (near copies); save checkpoints further apart or keep the learning "
                         "rate up in stage 1 (prepare.train.schedule_epochs)") if report["degenerate"] else None
    return report


def normalized_entropy(counts: list[int]) -> float:
    """Entropy of the distribution `counts` over len(counts) outcomes, divided by log of that (0..1)."""
    total = sum(counts)
    if total == 0 or len(counts) < 2:
        return 0.0
    h = -sum(c / total * math.log(c / total) for c in counts if c)
    return max(0.0, h / math.log(len(counts)))  # (never -0.0)


def seed_diversity(ppl: torch.Tensor, owners: torch.Tensor) -> dict:
    """ppl: (samples, experts) perplexities; owners: the buckets route trains on (after any fill)."""
    n = ppl.shape[1]
    spread = (ppl.max(1).values / ppl.min(1).values - 1).double()
    argmin = ppl.argmin(1)
    sizes = [int((argmin == e).sum()) for e in range(n)]
    used = [int((owners == e).sum()) for e in range(n)]
    report = {"ppl_spread": {"median": float(spread.median()), "mean": float(spread.mean()), "max": float(spread.max())},
              "argmin_bucket_sizes": sizes, "argmin_bucket_entropy": normalized_entropy(sizes),
              "bucket_sizes": used, "bucket_entropy": normalized_entropy(used)}
    problems = []
    if report["ppl_spread"]["median"] < PPL_SPREAD_MIN:
        problems.append(f"the experts are nearly indistinguishable on the seed data: median perplexity spread "
                        f"{report['ppl_spread']['median']:.3f} < {PPL_SPREAD_MIN}")
    if report["argmin_bucket_entropy"] < BUCKET_ENTROPY_MIN:
        problems.append(f"one expert owns most seed samples: argmin bucket sizes {sizes}, normalized entropy "
                        f"{report['argmin_bucket_entropy']:.2f} < {BUCKET_ENTROPY_MIN}")
    report["degenerate"] = bool(problems)
    report["warning"] = "; ".join(problems) or None
    return report
