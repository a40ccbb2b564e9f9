"""Experts on disk: read any expert's MLP task vector tau (per layer and projection) lazily.

Two kinds, one interface:
  FFN expert   a full checkpoint (prepare mode `full`) or an expert folder of MLP tensors:
               tau = W - W_base for `model.layers.L.mlp.P.weight`
  LoRA expert  a peft adapter folder: tau = (alpha / r) * B @ A for the adapter on layers.L.mlp.P
A key is (layer, projection). Nothing is held beyond the tensor asked for.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from upcycle.errors import UpcycleError
from upcycle.io.safetensors_io import SafetensorsReader
from upcycle.io.user_files import read_json_object
from upcycle.moe.experts import PROJS

FFN_KEY = "model.layers.{layer}.mlp.{proj}.weight"
FFN_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")
LORA_RE = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.mlp\.(\w+)\.lora_([AB])(?:\.default)?\.weight$")
LORA_ANY_RE = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])(?:\.default)?\.weight$")
Key = tuple[int, str]
PEFT_DEFAULT_ALPHA = 8  # peft's LoraConfig.lora_alpha default, for a config that leaves it out


def ffn_name(key: Key) -> str:
    return FFN_KEY.format(layer=key[0], proj=key[1])


class FFNExpert:
    kind = "ffn"

    def __init__(self, path: Path):
        self.path = Path(path)
        self.reader = SafetensorsReader(sorted(self.path.glob("*.safetensors")))
        if not self.reader.tensors:
            raise UpcycleError(f"expert {self.path}: no safetensors weights")
        found = {(int(m.group(1)), m.group(2)) for m in map(FFN_RE.match, self.reader.names()) if m}
        self.keys: list[Key] = sorted(found, key=lambda k: (k[0], PROJS.index(k[1])))

    def weight_files(self) -> list[Path]:
        return sorted({info.file for info in self.reader.tensors.values()})

    def shape(self, key: Key) -> tuple[int, ...]:
        return tuple(self.reader.tensors[ffn_name(key)].shape)

    def weight(self, key: Key) -> torch.Tensor:
        return self.reader.get(ffn_name(key)).float()

    def tau(self, key: Key, base: torch.Tensor) -> torch.Tensor:
        return self.weight(key) - base


class LoRAExpert:
    kind = "lora"

    def __init__(self, path: Path):
        self.path = Path(path)
        weights = self.path / "adapter_model.safetensors"
        cfg_path = self.path / "adapter_config.json"
        if not weights.is_file() or not cfg_path.is_file():
            raise UpcycleError(f"expert {self.path}: not a peft adapter folder (adapter_model.safetensors + adapter_config.json)")
        cfg = read_json_object(cfg_path, "peft adapter config", "re-save the adapter with peft's save_pretrained")
        self.rank, self.scaling = adapter_rank_and_scaling(cfg, cfg_path)
        self.base_model: str | None = cfg.get("base_model_name_or_path")  # what the adapter was made on
        self.reader = SafetensorsReader([weights])
        self.names: dict[Key, dict[str, str]] = {}
        for name in self.reader.names():
            m = LORA_RE.match(name)
            if m:
                self.names.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = name
        self.keys: list[Key] = sorted(self.names, key=lambda k: (k[0], PROJS.index(k[1]) if k[1] in PROJS else 9))
        if not self.keys:
            raise UpcycleError(f"expert {self.path}: the adapter has no LoRA weights on MLP projections")

    def weight_files(self) -> list[Path]:
        return [self.path / "adapter_model.safetensors"]

    def factors(self, key: Key) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (r, in), B (out, r)) as stored."""
        n = self.names[key]
        return self.reader.get(n["A"]).float(), self.reader.get(n["B"]).float()

    def shape(self, key: Key) -> tuple[int, ...]:
        n = self.names[key]
        return (self.reader.tensors[n["B"]].shape[0], self.reader.tensors[n["A"]].shape[1])

    def tau(self, key: Key, base: torch.Tensor | None = None) -> torch.Tensor:
        a, b = self.factors(key)
        return self.scaling * (b @ a)

    def other_deltas(self) -> dict[str, torch.Tensor]:
        """(alpha / r) * B @ A of the adapter's modules outside the MLPs (e.g. attention), by the
        base weight's name: the part of a LoRA expert that cannot become an MoE expert."""
        pairs: dict[str, dict[str, str]] = {}
        for name in self.reader.names():
            m = LORA_ANY_RE.match(name)
            if m and not LORA_RE.match(name):
                pairs.setdefault(f"{m.group(1)}.weight", {})[m.group(2)] = name
        return {w: self.scaling * (self.reader.get(ab["B"]).float() @ self.reader.get(ab["A"]).float())
                for w, ab in pairs.items()}


def common_scaling(experts: list) -> float:
    """The LoRA scale (alpha / r) of an MoE made of these LoRA experts: their own when they share one,
    so B stays as trained and the optimizer moves each delta as it did in stage 1 (folding a scale
    of 2 into B and training at scale 1 halves B's effective step under Adam); else 1, with each
    expert's scale folded into its B (exact for the forward pass)."""
    scales = {round(e.scaling, 12) for e in experts}
    return experts[0].scaling if len(scales) == 1 else 1.0


def adapter_rank_and_scaling(cfg: dict, where: Path) -> tuple[int, float]:
    """peft's `r` (a positive integer) and the delta's scale: lora_alpha / r, or lora_alpha / sqrt(r)
    under rsLoRA (`lora_alpha` a positive number, peft's default 8 when absent). What a plain
    B @ A delta cannot express (DoRA, per-module ranks or alphas) is refused, not misread."""
    r = cfg.get("r")
    if type(r) is not int or r <= 0:
        given = "no r" if "r" not in cfg else f"r={r!r}"
        raise UpcycleError(f"{where}: {given}; a peft adapter config needs the LoRA rank r as a positive integer "
                           "(re-save the adapter with peft)")
    alpha = cfg.get("lora_alpha", PEFT_DEFAULT_ALPHA)
    if type(alpha) not in (int, float) or not math.isfinite(alpha) or alpha <= 0:
        raise UpcycleError(f"{where}: lora_alpha={alpha!r}; it must be a positive number (re-save the adapter with peft)")
    for key in ("use_dora", "rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise UpcycleError(f"{where}: {key}={cfg[key]!r}; upcycle reads plain LoRA adapters (one rank and alpha, "
                               "delta = scale * B @ A) and cannot express this one")
    return r, float(alpha) / (math.sqrt(r) if cfg.get("use_rslora") else r)


def open_expert(path: str | Path):
    path = Path(path)
    if (path / "adapter_config.json").is_file():
        return LoRAExpert(path)
    return FFNExpert(path)


def lora_factors_from_delta(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-r factors (A, B) of a delta by SVD, with B @ A ~ delta; returns the relative
    Frobenius error ||delta - B A|| / ||delta|| (0 when rank >= the delta's rank)."""
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    r = min(rank, s.numel())
    b = u[:, :r] * s[:r]  # (out, r)
    a = vh[:r]  # (r, in)
    if r < rank:  # pad to the requested rank with zeros (exact)
        b = torch.cat([b, torch.zeros(b.shape[0], rank - r)], dim=1)
        a = torch.cat([a, torch.zeros(rank - r, a.shape[1])], dim=0)
    norm = delta.norm()
    error = ((delta - b @ a).norm() / norm).item() if norm > 0 else 0.0
    return a, b, error
