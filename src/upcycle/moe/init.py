"""Dense MLP -> experts and routers: the initializers of SPEC sections 2 and 3, as pure tensor math.

    copy           every expert is the dense MLP (sparse upcycling)
    virtual_group  the MLP is split into G shards along the intermediate dim; expert j holds
                   shard j mod G; router rows come in blocks of G identical rows, so top-G picks
                   one whole copy of the MLP (NVIDIA)
    drop           copy (or shard), then re-initialize floor(r * I_e) intermediate indices per
                   expert from N(mean, std) of the weights they replace (Drop-Upcycling)
    noise          copy (or shard) plus N(0, (noise_std * std(W))^2) on every matrix

Each random draw takes a generator made from the run seed and a stable name, so an expert's
weights do not depend on which other experts were made before it. Drop and noise draw on the
generator's device, which `init_expert` makes the dense weights' device: on the CPU the numbers are
those of `upcycle.seeding.generator`; on CUDA they are other numbers (torch's CUDA generator is
Philox, not the CPU's Mersenne twister), deterministic for a seed. Router rows and LoRA A are
small and drawn on the CPU, so they are the same numbers on every device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from upcycle.config import InitSpec, MoESpec, Routing
from upcycle.devices import device_generator


@dataclass
class MLPWeights:
    """One SwiGLU MLP: down(act(gate(x)) * up(x)). gate, up: (I, H); down: (H, I)."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor

    @property
    def width(self) -> int:
        return self.gate.shape[0]

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {"gate_proj": self.gate, "up_proj": self.up, "down_proj": self.down}


# ----------------------------------------------------------------- virtual groups and scaling


def shard(dense: MLPWeights, index: int, granularity: int) -> MLPWeights:
    """Shard `index` of G along the intermediate dim; the G shards' outputs sum to the dense output."""
    width = dense.width // granularity
    rows = slice(index * width, (index + 1) * width)
    return MLPWeights(dense.gate[rows], dense.up[rows], dense.down[:, rows])


def activation_scale(num_experts: int, granularity: int, top_k: int, routing: Routing) -> float:
    """a: how much smaller the MoE output is than the dense MLP's at init (NVIDIA, section 3.2).

    softmax_topk: each of the T chosen experts weighs about 1/N = 1/(E*G), and T/G whole copies are
    chosen, so the output is T/(E*G^2) of the dense one: a = E*G^2/T. With renormalized weights
    (topk_softmax), T weights of 1/T over T/G copies give 1/G of it: a = G.
    """
    expansion = num_experts // granularity
    if routing == "softmax_topk":
        return expansion * granularity**2 / top_k
    return float(granularity)


MLPKind = Literal["gated", "squared_relu", "plain"]


def nvidia_scale(a: float, mlp_kind: MLPKind = "gated") -> float:
    """s applied to every input and output projection: a^(1/3) when the MLP is cubic in s
    (SwiGLU's gate*up*down, squared ReLU), a^(1/2) for a plain two-matrix MLP."""
    return a ** (1 / 3) if mlp_kind in ("gated", "squared_relu") else a ** (1 / 2)


def projection_scales(spec: MoESpec, init: InitSpec) -> tuple[float, float, float]:
    """(gate, up, down) multipliers for every routed expert."""
    if init.weight_scaling == "none":
        return 1.0, 1.0, 1.0
    a = activation_scale(spec.num_experts, spec.granularity, spec.top_k, spec.routing)
    if init.weight_scaling == "nvidia":
        s = nvidia_scale(a, "gated")
        return s, s, s
    return 1.0, 1.0, a  # "output": exact, since down is linear


# ----------------------------------------------------------------- drop and noise


def drop_reinit(w: MLPWeights, ratio: float, index_sets: Literal["shared", "per_matrix"],
                gen: torch.Generator) -> MLPWeights:
    """Re-initialize floor(ratio * I) intermediate indices: rows of gate/up, columns of down.

    New values ~ N(mean, std) of the block they replace, so the re-drawn weights keep the scale
    of the pre-trained ones (Drop-Upcycling, section 3).
    """
    width = w.width
    count = math.floor(ratio * width)

    def pick() -> torch.Tensor:
        return torch.randperm(width, generator=gen, device=gen.device)[:count].sort().values

    shared = pick()
    out = {}
    for name, matrix, dim in (("gate", w.gate, 0), ("up", w.up, 0), ("down", w.down, 1)):
        idx = shared if index_sets == "shared" else pick()
        new = matrix.clone()
        block = matrix.index_select(dim, idx.to(matrix.device)).float()
        if count:
            mean, std = block.mean(), block.std(unbiased=False)
            fresh = torch.empty(block.shape, dtype=torch.float32, device=gen.device).normal_(0.0, 1.0, generator=gen)
            new.index_copy_(dim, idx.to(matrix.device), (fresh.to(matrix.device) * std + mean).to(matrix.dtype))
        out[name] = new
    return MLPWeights(**out)


def dropped_indices(original: torch.Tensor, dropped: torch.Tensor, dim: int) -> torch.Tensor:
    """Which intermediate indices differ between two matrices (for tests and reports)."""
    other = 1 - dim
    return (original != dropped).any(dim=other).nonzero().flatten()


def add_noise(w: MLPWeights, std_ratio: float, gen: torch.Generator) -> MLPWeights:
    def noisy(m: torch.Tensor) -> torch.Tensor:
        z = torch.empty(m.shape, dtype=torch.float32, device=gen.device).normal_(0.0, 1.0, generator=gen)
        return (m.float() + z.to(m.device) * std_ratio * m.float().std()).to(m.dtype)

    return MLPWeights(noisy(w.gate), noisy(w.up), noisy(w.down))


# ----------------------------------------------------------------- experts and routers


def init_expert(dense: MLPWeights, expert: int, layer: int, spec: MoESpec, init: InitSpec, seed: int) -> MLPWeights:
    """Routed expert `expert` of MoE layer `layer`: shard, scale, then drop or noise."""
    w = shard(dense, expert % spec.granularity, spec.granularity)
    gate_s, up_s, down_s = projection_scales(spec, init)
    if (gate_s, up_s, down_s) != (1.0, 1.0, 1.0):
        w = MLPWeights(w.gate * gate_s, w.up * up_s, w.down * down_s)
    if init.method == "drop":
        gen = device_generator(dense.gate.device, seed, "layer", layer, "expert", expert, "drop")
        w = drop_reinit(w, init.drop_ratio, init.drop_index_sets, gen)
    elif init.method == "noise":
        w = add_noise(w, init.noise_std, device_generator(dense.gate.device, seed, "layer", layer, "expert", expert, "noise"))
    return w


def init_shared_expert(dense: MLPWeights, spec: MoESpec) -> MLPWeights:
    """Shared experts j = 0..S-1 hold shards j mod G, concatenated into one always-on MLP (width 0 if S = 0)."""
    if spec.num_shared_experts == 0:
        return MLPWeights(dense.gate[:0], dense.up[:0], dense.down[:, :0])
    shards = [shard(dense, j % spec.granularity, spec.granularity) for j in range(spec.num_shared_experts)]
    return MLPWeights(
        torch.cat([s.gate for s in shards]), torch.cat([s.up for s in shards]), torch.cat([s.down for s in shards], dim=1)
    )


def init_router(num_experts: int, hidden: int, granularity: int, std: float, gen: torch.Generator) -> torch.Tensor:
    """(N, H) router: one random row per block of G experts, repeated G times (G = 1: all random)."""
    rows = torch.empty(num_experts // granularity, hidden, dtype=torch.float32).normal_(0.0, std, generator=gen)
    return rows.repeat_interleave(granularity, dim=0)


def init_lora_a(num_experts: int, rank: int, fan_in: int, gen: torch.Generator) -> torch.Tensor:
    """(E, r, fan_in) LoRA A matrices, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) as peft's default
    (kaiming-uniform with a=sqrt(5)); B starts at zero so every expert starts as the dense MLP."""
    bound = 1.0 / math.sqrt(fan_in)
    return torch.empty(num_experts, rank, fan_in, dtype=torch.float32).uniform_(-bound, bound, generator=gen)
