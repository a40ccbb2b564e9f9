"""Seeded random generators: every random draw in upcycle takes one of these, never the global RNG.

A generator is derived from the run seed and a stable name ("layer3.router"), so a draw does not
depend on the order in which other draws happen: streaming and in-memory upcycling, or a resumed
run, give bit-identical tensors.
"""

import hashlib

import torch


def derive_seed(seed: int, *names: object) -> int:
    """A 63-bit integer from the run seed and a name path; stable across processes and platforms."""
    key = ":".join([str(int(seed)), *map(str, names)]).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & ((1 << 63) - 1)


def generator(seed: int, *names: object) -> torch.Generator:
    """A CPU torch.Generator seeded from (seed, *names)."""
    g = torch.Generator(device="cpu")
    g.manual_seed(derive_seed(seed, *names))
    return g
