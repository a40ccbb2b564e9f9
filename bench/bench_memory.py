"""Benchmark: peak memory of every stage at two model sizes on CPU, the per-stage formula, and
what it predicts for Llama-3-8B on 8 GPUs of 80 GB.

    .venv/bin/python bench/bench_memory.py [--hidden 256 512] [--precision bf16]

Each stage runs as its own process (`python -m upcycle.cli STAGE ...`, as a user runs it) on a
dense Llama of the stock class (4 layers, intermediate 3.5 H and GQA 4:1 as Llama-3, vocab 8192,
untied embeddings); its peak is the child's ru_maxrss from os.wait4, so it counts the Python
runtime, torch and the data too.

The formula: peak(stage) = a + F(stage, model), where F is what the stage holds by design
(bytes per parameter of each role, below) and a is everything else (runtime, data, activations of
the bench's fixed batch), taken from the smaller model. The check: F with that a predicts the
larger model's peak, printed beside the measured one. For 8B, F is given per rank under DDP
(every rank holds all of it) and under FSDP/ZeRO-3 full sharding over 8 ranks (F / 8 plus one
gathered layer); activations are left out (they depend on batch and length, and on gradient
checkpointing), and a is host memory of the runtime, not of the GPU.

Bytes per parameter (w: the weights' dtype, 2 for bf16; the Trainer keeps fp32 master copies of
trainable parameters, so each costs 4 weight + 4 grad + 8 Adam = 16):
    prepare lora   w * dense + 16 * LoRA(rank)                  frozen base, trainable adapters
    prepare full   16 * dense                                   everything trained
    expand         (12 * E + 16) * I * H                        one MLP tensor of every expert at a time: stacked in
                                                                fp32 and again in fp64 for the Gram matrix, + 4 fp32 work tensors
    route          w * MoE + 16 * routers                       MoE assembled in w, routers trained
    post_train     w * dense + 16 * (E * LoRA(r) + routers)     LoRA MoE: dense frozen, experts and routers trained
                   16 * MoE                                     FFN MoE: everything trained
    build          8 * (I * H * 4)                              streams the export one tensor at a time
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

GB = 1e9
STREAM_K = 8
"""Work tensors of size I x H in fp32 the streaming export (build) holds at once: an assumption
the two-size check tests."""
EXPERTS, TOP_K, LORA_RANK = 8, 2, 16


@dataclass(frozen=True)
class Shape:
    """What the formula needs of a dense Llama-style model."""
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    tied: bool = False

    @property
    def mlp(self) -> int:
        return self.layers * 3 * self.hidden * self.intermediate

    @property
    def dense(self) -> int:
        h, d = self.hidden, self.hidden // self.heads
        attn = h * h * 2 + 2 * h * self.kv_heads * d
        embed = self.vocab * h * (1 if self.tied else 2)
        return embed + self.layers * (attn + 3 * h * self.intermediate + 2 * h) + h

    def lora(self, rank: int) -> int:
        """LoRA factors on gate, up and down of every layer."""
        return self.layers * 3 * rank * (self.hidden + self.intermediate)

    @property
    def routers(self) -> int:
        return self.layers * EXPERTS * self.hidden

    @property
    def moe_ffn(self) -> int:
        return self.dense + (EXPERTS - 1) * self.mlp + self.routers

    @property
    def moe_lora(self) -> int:
        return self.dense + EXPERTS * self.lora(LORA_RANK) + self.routers

    @property
    def expand(self) -> int:
        return (12 * EXPERTS + 16) * self.intermediate * self.hidden

    @property
    def stream(self) -> int:
        return STREAM_K * self.intermediate * self.hidden * 4

    def layer(self, ffn: bool) -> int:
        """Parameters of one decoder layer of the MoE (what FSDP gathers at a time)."""
        moe = self.moe_ffn if ffn else self.moe_lora
        return (moe - self.vocab * self.hidden * (1 if self.tied else 2)) // self.layers


LLAMA3_8B = Shape(layers=32, hidden=4096, intermediate=14336, vocab=128256, heads=32, kv_heads=8)


def held_bytes(stage: str, s: Shape, w: int) -> int:
    """F: the bytes a stage holds by design (module docstring)."""
    return {
        "prepare lora": w * s.dense + 16 * s.lora(LORA_RANK),
        "prepare full": 16 * s.dense,
        "expand lora": s.expand,
        "expand ffn": s.expand,
        "route lora": w * s.moe_lora + 16 * s.routers,
        "route ffn": w * s.moe_ffn + 16 * s.routers,
        "post_train lora": w * s.dense + 16 * (s.moe_lora - s.dense),
        "post_train ffn": 16 * s.moe_ffn,
        "build": s.stream,
    }[stage]


SHARDED = {"prepare full", "post_train lora", "post_train ffn", "prepare lora"}
"""The stages that train under the Trainer and so can shard with FSDP / ZeRO-3."""


def peak_rss(cmd: list[str], env: dict) -> int:
    """Peak resident memory (bytes) of one child process, from the kernel's accounting."""
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{out.decode()[-3000:]}")
    return usage.ru_maxrss * 1024  # KiB on Linux


MAKE_BASE = """
import json, sys
from upcycle.tiny import save_tiny_model
s = json.loads(sys.argv[2])
path = save_tiny_model("llama", sys.argv[1], seed=0, vocab_size=s["vocab"], hidden_size=s["hidden"],
                       intermediate_size=s["intermediate"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                       num_key_value_heads=s["kv_heads"], tie_word_embeddings=s["tied"])
from transformers import AutoModelForCausalLM
print(sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(path).parameters()))
"""


def run_stages(shape: Shape, work: Path, precision: str) -> dict[str, int]:
    """Peak RSS of each stage for one model size."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TOKENIZERS_PARALLELISM": "false"}
    # The model is written by a child: a child's ru_maxrss starts at its parent's resident size
    # (fork), so this process stays small (no torch) for the children's peaks to be theirs.
    made = subprocess.run([sys.executable, "-c", MAKE_BASE, str(work / "base"), json.dumps(shape.__dict__)], env=env,
                          capture_output=True, text=True, check=True)
    params = int(made.stdout.split()[-1])
    if params != shape.dense:
        sys.exit(f"the formula counts {shape.dense} dense parameters, the model has {params}")
    base = work / "base"
    py = [sys.executable, "-m", "upcycle.cli"]
    data = ["--data", "suite", "data.suite.train_per_domain=32", "data.max_length=64", "data.eval_fraction=0"]
    train = [f"train.precision={precision}", "train.batch_size=4"]
    peaks = {"runtime (import only)": peak_rss([sys.executable, "-c", "import torch, transformers, upcycle.cli, "
                                                "upcycle.stages.post_train"], env)}
    for mode in ("lora", "full"):
        kind = "lora" if mode == "lora" else "ffn"
        prep, exp, route, post = (work / f"{n}_{kind}" for n in ("prepare", "expand", "route", "post_train"))
        peaks[f"prepare {mode}"] = peak_rss(py + ["prepare", "--base", str(base), "--out", str(prep), "--mode", mode,
                                                 "--epochs", "1", "--save-every", "0.5", "--quiet", *data, *train,
                                                 "evaluate=false", f"lora.rank={LORA_RANK}"], env)
        peaks[f"expand {kind}"] = peak_rss(py + ["expand", "--prepare", str(prep), "--out", str(exp), "--num-experts",
                                                 str(EXPERTS), "checkpoints=all"], env)
        peaks[f"route {kind}"] = peak_rss(py + ["route", "--expand", str(exp), "--out", str(route), "--quiet", *data,
                                                *train, "seed_count=16", "train.epochs=1", f"moe.top_k={TOP_K}"], env)
        peaks[f"post_train {kind}"] = peak_rss(py + [
            "post-train", "--expand", str(exp), "--route", str(route), "--out", str(post), "--quiet", *data, *train,
            f"moe.num_experts={EXPERTS}", f"moe.top_k={TOP_K}", f"moe.expert_type={'lora' if kind == 'lora' else 'mlp'}",
            "train.epochs=0.25", "save_every=0.25", "evaluate=false"], env)
    peaks["build"] = peak_rss(py + ["build", "--base", str(base), "--out", str(work / "build"), "--num-experts",
                                    str(EXPERTS), "--top-k", str(TOP_K), "--init", "copy"], env)
    return peaks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, nargs=2, default=[256, 512], help="the two model sizes (hidden width)")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    args = ap.parse_args()

    w = 2 if args.precision == "bf16" else 4
    shapes = [Shape(layers=4, hidden=h, intermediate=h * 7 // 2, vocab=8192, heads=h // 64, kv_heads=max(1, h // 256))
              for h in args.hidden]
    measured = []
    for shape in shapes:
        work = Path(tempfile.mkdtemp(prefix="bench-memory-", dir=ROOT / "bench"))
        try:
            measured.append(run_stages(shape, work, args.precision))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    small, large = shapes
    print(f"models: dense {small.dense / 1e6:.2f}M and {large.dense / 1e6:.2f}M parameters; {EXPERTS} experts top-{TOP_K}, "
          f"LoRA rank {LORA_RANK}, {args.precision}; peak RSS of each stage's process")
    rows = []
    w8 = 2  # Llama-3-8B in bf16
    for stage in measured[0]:
        m1, m2 = measured[0][stage], measured[1][stage]
        if stage.startswith("runtime"):
            rows.append((stage, m1, m2, None, None, None, None))
            continue
        a = m1 - held_bytes(stage, small, w)
        predicted = a + held_bytes(stage, large, w)
        f8 = held_bytes(stage, LLAMA3_8B, w8)
        fsdp = f8 / 8 + w8 * LLAMA3_8B.layer(stage.endswith("ffn")) if stage in SHARDED else None
        rows.append((stage, m1, m2, predicted, a, f8, fsdp))
    header = ("| stage | peak, H=%d (MB) | peak, H=%d (MB) | predicted for H=%d from H=%d (MB) | a (MB) "
              "| 8B held, DDP per rank (GB) | 8B held, FSDP/ZeRO-3 x8 per rank (GB) |" % (*args.hidden, args.hidden[1], args.hidden[0]))
    lines = [header, "|" + " --- |" * 7]
    for stage, m1, m2, pred, a, f8, fsdp in rows:
        if pred is None:
            lines.append(f"| {stage} | {m1 / 1e6:.0f} | {m2 / 1e6:.0f} | | | | |")
            continue
        err = (pred - m2) / m2 * 100
        lines.append(f"| {stage} | {m1 / 1e6:.0f} | {m2 / 1e6:.0f} | {pred / 1e6:.0f} ({err:+.0f} %) | {a / 1e6:.0f} "
                     f"| {f8 / GB:.1f} | {'' if fsdp is None else f'{fsdp / GB:.1f}'} |")
    print("\n".join(lines))
    print(f"\nLlama-3-8B: dense {LLAMA3_8B.dense / GB:.2f}B parameters, FFN MoE x{EXPERTS} {LLAMA3_8B.moe_ffn / GB:.1f}B, "
          f"LoRA MoE x{EXPERTS} (rank {LORA_RANK}) {LLAMA3_8B.moe_lora / GB:.2f}B; 8B columns: bf16 weights, fp32 master "
          "+ grads + Adam for trainable parameters, activations excluded; a GPU has 80 GB.")


if __name__ == "__main__":
    main()
