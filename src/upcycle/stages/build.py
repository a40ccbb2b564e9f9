"""`upcycle build`: one-shot dense -> MoE, streamed tensor by tensor from the dense checkpoint.

    upcycle build --base DENSE_DIR --out OUT_DIR --num-experts 8 --top-k 2 --init copy

The story: validate the whole config and the base folder (config.json and safetensors headers,
no weights); choose the output format; plan every output tensor; then stream: for each layer read
its dense MLP once, make the router and the experts one at a time, write them, drop them. The
output appears under its final name only when complete.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path

import torch

from upcycle.architectures import DENSE_ARCHITECTURES, OWN_FORMAT, dense_architecture
from upcycle.config import BuildConfig
from upcycle.config_io import dump_config
from upcycle.dense_config import unknown_key_problems
from upcycle.errors import UpcycleError
from upcycle.export.save import format_name, resolve_format, write_moe_folder
from upcycle.io.atomic import claim_output
from upcycle.io.model_folder import ModelFolder
from upcycle.models import model_ref
from upcycle.moe.experts import PROJS
from upcycle.moe.init import MLPWeights
from upcycle.moe.layer import LayerDims, UpcycledLayer

IGNORED_TENSORS = ("rotary_emb.inv_freq",)  # buffers some old checkpoints carry; recomputed at load


class BuildPlan:
    """Everything `run` needs, checked: the base folder, its reader, the target and the layers."""

    def __init__(self, cfg: BuildConfig):
        self.cfg = cfg
        problems: list[str] = []
        self.base = model_ref(cfg.base, "base")
        self.folder = ModelFolder(self.base.path, allow_pickle=cfg.allow_pickle)
        dense = self.folder.config
        arch = dense_architecture(self.folder.model_type)
        if arch is None:
            hint = " (it needs remote code, which upcycle does not run)" if "auto_map" in dense else ""
            raise UpcycleError(f"base {cfg.base}: model_type {self.folder.model_type!r} is not supported{hint}; "
                               f"upcycle takes {', '.join(DENSE_ARCHITECTURES)} dense models")
        self.arch = arch
        # Keys the dense class does not define may change the model; refuse rather than drop them.
        problems.extend(unknown_key_problems(dense, self.folder.path / "config.json"))
        for key, want in arch.requires.items():
            if dense.get(key, want) != want:
                problems.append(f"base {cfg.base}: {key}={dense.get(key)!r} is not supported (needs {want!r})")
        spec = cfg.moe
        intermediate, n_layers = dense["intermediate_size"], dense["num_hidden_layers"]
        if intermediate % spec.granularity:
            problems.append(f"moe.granularity: {spec.granularity} does not divide the base's intermediate_size="
                            f"{intermediate}; choose a divisor")
        self.moe_layers = list(range(n_layers)) if spec.layers is None else sorted(spec.layers)
        bad = [l for l in self.moe_layers if not 0 <= l < n_layers]
        if bad:
            problems.append(f"moe.layers: {bad} out of range; the base has layers 0..{n_layers - 1}")
        try:
            self.target = resolve_format(cfg.export.format, dense, spec, cfg.export.lora_storage)
        except UpcycleError as e:
            problems.extend(e.problems)
        try:
            claim_output(cfg.out, [self.base.path], cfg.force)
        except UpcycleError as e:
            problems.extend(e.problems)
        if problems:
            raise UpcycleError(*problems)
        self.dims = LayerDims(dense["hidden_size"], intermediate, spec)
        self.reader = self.folder.reader()  # checks every header: truncation and corruption
        self.passthrough = self._passthrough()

    def _passthrough(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Dense tensors copied as they are; checks that each MoE layer's MLP is exactly gate/up/down."""
        mlp_keys = {self.arch.mlp_key(l, p): (l, p) for l in self.moe_layers for p in PROJS}
        moe_prefixes = tuple(self.arch.mlp_prefix.format(layer=l) for l in self.moe_layers)
        h, i = self.dims.hidden, self.dims.intermediate
        want = {"gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
        out = {}
        for name, info in self.reader.tensors.items():
            if name.endswith(IGNORED_TENSORS):
                continue
            if name in mlp_keys:
                proj = mlp_keys[name][1]
                if tuple(info.shape) != want[proj]:
                    raise UpcycleError(f"base {self.cfg.base}: {name} has shape {list(info.shape)}, config.json implies {list(want[proj])}")
            elif name.startswith(moe_prefixes):
                raise UpcycleError(f"base {self.cfg.base}: unexpected MLP tensor {name}; upcycle's experts have "
                                   "gate/up/down weights only and would drop it")
            else:
                out[name] = (tuple(info.shape), info.dtype)
        missing = [k for k in mlp_keys if k not in self.reader.tensors]
        if missing:
            raise UpcycleError(f"base {self.cfg.base}: missing MLP weight {missing[0]}")
        return out

    def moe_dtype(self) -> torch.dtype:
        return self.reader.tensors[self.arch.mlp_key(self.moe_layers[0], "gate_proj")].dtype


class StreamingProvider:
    """Serves the writer: dense tensors from the reader, MoE tensors from the current layer's upcycle."""

    def __init__(self, plan: BuildPlan):
        self.plan = plan
        self._layer: tuple[int, UpcycledLayer] | None = None

    def _upcycled(self, layer: int) -> UpcycledLayer:
        if self._layer is None or self._layer[0] != layer:
            self._layer = None  # free the previous layer before reading the next
            p = self.plan
            read = lambda proj: p.reader.get(p.arch.mlp_key(layer, proj)).float()  # noqa: E731
            dense = MLPWeights(read("gate_proj"), read("up_proj"), read("down_proj"))
            self._layer = (layer, UpcycledLayer(dense, layer, p.cfg.moe, p.cfg.init, p.cfg.seed))
        return self._layer[1]

    def __call__(self, part: tuple) -> torch.Tensor:
        if part[0] == "tensor":
            return self.plan.reader.get(part[1])
        return self._upcycled(part[1]).get(part[2:])


def run(cfg: BuildConfig, progress: bool = True) -> dict:
    """Build the MoE folder described by `cfg`; returns a summary (also written to the folder)."""
    started = time.perf_counter()
    plan = BuildPlan(cfg)
    provider = StreamingProvider(plan)

    def extra(tmp: Path) -> None:
        plan.folder.copy_tokenizer(tmp)
        dump_config(cfg, tmp / "upcycle_config.yaml")

    base_ref = None
    base_path = str(plan.base.path.resolve())
    if plan.target == OWN_FORMAT and cfg.moe.expert_type == "lora" and cfg.export.lora_storage == "compact":
        base_ref = {"path": base_path, "fingerprint": plan.folder.fingerprint()}
    provenance = {"tool": "upcycle build", "base": base_path, "base_fingerprint": plan.folder.fingerprint(),
                  "base_source": plan.base.record(), "seed": cfg.seed, "moe_layers": plan.moe_layers,
                  "init": cfg.init.model_dump(mode="json")}
    written = write_moe_folder(
        Path(cfg.out), target=plan.target, dense_cfg=plan.folder.config, spec=cfg.moe, moe_layers=plan.moe_layers,
        passthrough=plan.passthrough, provider=provider, moe_dtype=plan.moe_dtype(), export=cfg.export,
        force=cfg.force, extra=extra, provenance=provenance, base_ref=base_ref, progress=progress,
        inputs=[plan.base.path], input_bytes=sum(f.stat().st_size for f in plan.folder.weight_files),
    )
    return {
        **written,
        "format": format_name(plan.target),
        "out": str(cfg.out),
        "experts": cfg.moe.num_experts, "top_k": cfg.moe.top_k, "routing": cfg.moe.routing,
        "granularity": cfg.moe.granularity, "init": cfg.init.method, "moe_layers": len(plan.moe_layers),
        "dense_parameters": sum(int(torch.Size(t.shape).numel()) for t in plan.reader.tensors.values()),
        "seconds": time.perf_counter() - started,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
