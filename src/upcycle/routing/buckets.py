"""The routing buckets of UpIT stage 3 as plain tensor math: which seed samples are drawn, and which
expert owns each one given the (samples, experts) perplexity matrix.

It is its own module because two stages bucket seed data this way: `route` (UpIT stage 3) and
`mix` (router_init: ppl). No model, no I/O: the perplexities come from upcycle/routing/scoring.py.
"""

from __future__ import annotations

import math
import random
import warnings
import torch

from upcycle.errors import UpcycleError


def seed_count(n: int, count: int | None, fraction: float, num_experts: int, min_per_expert: int) -> int:
    """How many seed samples: `count` if given, else `fraction` of the n rows (the paper: 1%) raised to
    `min_per_expert` per expert (so that every expert can own a few), never more than the rows."""
    if count is not None:
        if count > n:
            raise UpcycleError(f"seed_count: {count} is more than the {n} training samples the seed set is drawn "
                               f"from; choose at most {n}")
        return count
    wanted = max(round(fraction * n), min_per_expert * num_experts)
    if wanted < 1:
        raise UpcycleError(f"seed_fraction: {fraction} of {n} training samples gives no seed samples; "
                           "raise seed_fraction or set seed_count")
    return min(wanted, n)


def seed_indices(n: int, count: int, seed: int) -> list[int]:
    """`count` of the n training rows, drawn with the run seed, in row order."""
    order = list(range(n))
    random.Random(f"seed-data:{seed}").shuffle(order)
    return sorted(order[:count])


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
                     "closest to their owner's (empty_bucket=steal, not in the paper)")
    for note in notes:
        warnings.warn(note)
    return owners, notes

