"""Benchmark: training-step tokens/s of upcycle's MoE layer against dense and the stock MoE classes.

    .venv/bin/python bench/bench_moe_train.py                      # CPU, fp32, the issue 11 shapes
    .venv/bin/python bench/bench_moe_train.py --quick              # fewer repeats
    .venv/bin/python bench/bench_moe_train.py --device cuda --dtype bf16

One training step = forward + backward + AdamW on a random batch (hidden 256, intermediate 704,
4 layers, sequence 256, batch 4 by default), every model built in memory from the same dense Llama
(nothing downloaded). Cases:

  8E top-2 full width   upcycle (grouped, eager) vs stock Mixtral, each experts_implementation
  64E top-8 G8 (E8G8T8) upcycle (grouped, eager) vs stock Qwen2-MoE, each experts_implementation;
                        the same active FLOPs as dense
  LoRA-MoE 8E top-2 r16 upcycle LoRA experts (grouped, eager; LoRA factors and routers trained)
                        vs dense peft LoRA of the same rank on the same MLP projections

Every model runs a few warm-up steps; then the models take turns (round-robin) for `--repeats`
rounds of `--steps` steps, and each reports the median over rounds, so a neighbour's load on a
shared CPU hits all of them alike. Stock implementations that cannot run here (batched_mm gathers
one weight matrix per token: gigabytes at these shapes) are reported as skipped with the reason.
Prints the tokens/s table, the ratios and the goals of issue 11.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

STOCK_IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")
CPU_MEMORY_LIMIT_BYTES = 4 << 30  # stock batched_mm keeps (T*k, 3*I_e, H) gathered weights per layer for backward


@dataclass
class Entry:
    case: str
    name: str
    make: Callable[[], torch.nn.Module]
    model: torch.nn.Module | None = None
    opt: torch.optim.Optimizer | None = None
    times: list[float] | None = None
    skipped: str | None = None


def dense_config(args):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                       num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=args.vocab,
                       max_position_embeddings=args.seq, tie_word_embeddings=False)


def stock_config(kind: str, args, experts: int, top_k: int, width: int):
    from transformers import MixtralConfig, Qwen2MoeConfig

    common = dict(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                  num_key_value_heads=args.heads, vocab_size=args.vocab, max_position_embeddings=args.seq,
                  tie_word_embeddings=False, output_router_logits=True, router_aux_loss_coef=0.01)
    if kind == "mixtral":
        return MixtralConfig(intermediate_size=width, num_local_experts=experts, num_experts_per_tok=top_k, **common)
    return Qwen2MoeConfig(intermediate_size=args.intermediate, moe_intermediate_size=width, num_experts=experts,
                          num_experts_per_tok=top_k, shared_expert_intermediate_size=0, norm_topk_prob=False,
                          qkv_bias=False, decoder_sparse_step=1, **common)


def memory_limit(device: str) -> int:
    if torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info(torch.device(device))[0] // 2
    return CPU_MEMORY_LIMIT_BYTES


def seeded(fn):
    def make():
        torch.manual_seed(0)
        return fn()
    return make


def build_entries(args) -> list[Entry]:
    from transformers import AutoModelForCausalLM

    from upcycle import InitSpec, MoESpec, upcycle_model
    from upcycle.config import LoRAExpertSpec
    from upcycle.moe.experts import set_experts_implementation
    from upcycle.moe.model import moe_blocks

    dense = seeded(lambda: AutoModelForCausalLM.from_config(dense_config(args)))
    tokens = args.batch * args.seq

    def upcycled(spec, impl):
        def make():
            init = InitSpec(method="virtual_group" if spec.granularity > 1 else "copy")
            model = upcycle_model(dense(), spec, init, seed=0)
            g = torch.Generator().manual_seed(1)
            with torch.no_grad():  # an ordinary random router, as the stock classes start with
                for _, block in moe_blocks(model):
                    block.router.weight.copy_(torch.randn(block.router.weight.shape, generator=g) * 0.02)
            if spec.expert_type == "lora":  # LoRA-MoE post-training: factors and routers learn
                for name, p in model.named_parameters():
                    p.requires_grad_("lora_" in name or name.endswith("router.weight"))
            return set_experts_implementation(model, impl)
        return make

    def stock(kind, experts, top_k, width, impl):
        return seeded(lambda: AutoModelForCausalLM.from_config(stock_config(kind, args, experts, top_k, width),
                                                              experts_implementation=impl))

    def dense_lora():
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                         target_modules=["gate_proj", "up_proj", "down_proj"])
        return get_peft_model(dense(), cfg)

    cases = [("8E top-2", "mixtral", MoESpec(num_experts=8, top_k=2, routing="topk_softmax"), 8, 2, args.intermediate),
             ("64E top-8 G8", "qwen2_moe", MoESpec(num_experts=64, top_k=8, granularity=8, routing="softmax_topk"),
              64, 8, args.intermediate // 8)]
    entries = [Entry("dense", "dense", dense)]
    for case, kind, spec, experts, top_k, width in cases:
        entries += [Entry(case, "upcycle grouped", upcycled(spec, "grouped")),
                    Entry(case, "upcycle eager", upcycled(spec, "eager"))]
        for impl in STOCK_IMPLEMENTATIONS:
            e = Entry(case, f"{kind} {impl}", stock(kind, experts, top_k, width, impl))
            gathered = tokens * top_k * 3 * width * args.hidden * args.bytes * args.layers
            if impl == "batched_mm" and gathered > memory_limit(args.device):
                e.skipped = f"needs ~{gathered / 2**30:.0f} GiB of gathered weights"
            entries.append(e)
    lora = MoESpec(num_experts=8, top_k=2, expert_type="lora",
                   lora=LoRAExpertSpec(rank=args.rank, alpha=2 * args.rank, targets=["gate_proj", "up_proj", "down_proj"]))
    entries += [Entry("LoRA", "dense peft LoRA", seeded(dense_lora)),
                Entry("LoRA", "upcycle LoRA-MoE grouped", upcycled(lora, "grouped")),
                Entry("LoRA", "upcycle LoRA-MoE eager", upcycled(lora, "eager"))]
    if args.only:
        entries = [e for e in entries if any(s in f"{e.case} {e.name}" for s in args.only)]
    return entries


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step(entry: Entry, ids: torch.Tensor) -> None:
    out = entry.model(input_ids=ids, labels=ids)
    out.loss.backward()
    entry.opt.step()
    entry.opt.zero_grad(set_to_none=True)


def prepare(entry: Entry, args, device, dtype, ids) -> None:
    try:
        entry.model = entry.make().to(device=device, dtype=dtype).train()
        params = [p for p in entry.model.parameters() if p.requires_grad]
        entry.opt = torch.optim.AdamW(params, lr=1e-4)
        for _ in range(args.warmup):
            step(entry, ids)
        sync(device)
        entry.times = []
    except Exception as exc:  # a stock implementation this torch/device lacks: report, keep going
        entry.skipped = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
        entry.model = entry.opt = None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=704)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5, help="round-robin rounds; each model reports its median")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per model per round")
    ap.add_argument("--quick", action="store_true", help="1 warm-up step, 3 rounds of 1 step")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--only", nargs="*", help="run only entries whose 'case name' contains one of these")
    args = ap.parse_args()
    if args.quick:
        args.warmup, args.repeats, args.steps = 1, 3, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    args.bytes = torch.finfo(dtype).bits // 8
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(device)
    tokens = args.batch * args.seq

    entries = build_entries(args)
    print(f"# {' '.join(sys.argv)}", flush=True)
    print(f"# torch {torch.__version__}, device {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, {args.dtype}, "
          f"{torch.get_num_threads()} threads; hidden {args.hidden}, intermediate {args.intermediate}, "
          f"{args.layers} layers, {args.batch}x{args.seq} tokens, {args.repeats} rounds x {args.steps} steps", flush=True)
    for e in entries:
        if e.skipped is None:
            prepare(e, args, device, dtype, ids)
    live = [e for e in entries if e.skipped is None]
    for r in range(args.repeats):
        for e in live:
            sync(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                step(e, ids)
            sync(device)
            e.times.append((time.perf_counter() - start) / args.steps)
        print(f"# round {r + 1}/{args.repeats} done", flush=True)

    tps = {(e.case, e.name): tokens / statistics.median(e.times) for e in live}
    print(f"\n{'case':14s} {'implementation':28s} {'tokens/s':>10s}  {'ms/step (min..max)':>20s}")
    for e in entries:
        if e.skipped is not None:
            print(f"{e.case:14s} {e.name:28s} {'-':>10s}  {e.skipped}")
        else:
            print(f"{e.case:14s} {e.name:28s} {tps[e.case, e.name]:10.0f}  "
                  f"{1e3 * min(e.times):9.1f}..{1e3 * max(e.times):.1f}")

    def ratio(num: tuple, den: tuple | list) -> float | None:
        dens = [d for d in (den if isinstance(den, list) else [den]) if d in tps]
        if num not in tps or not dens:
            return None
        return tps[num] / max(tps[d] for d in dens)

    print("\nratios and goals (issue 11)")
    for case, kind in (("8E top-2", "mixtral"), ("64E top-8 G8", "qwen2_moe")):
        stock = [(case, f"{kind} {impl}") for impl in STOCK_IMPLEMENTATIONS]
        report(f"{case}: upcycle grouped / best stock", ratio((case, "upcycle grouped"), stock), 1.0)
        report(f"{case}: upcycle grouped / upcycle eager", ratio((case, "upcycle grouped"), (case, "upcycle eager")), None)
    report("64E top-8 G8: upcycle grouped / dense", ratio(("64E top-8 G8", "upcycle grouped"), ("dense", "dense")), 0.8)
    report("LoRA-MoE grouped / dense peft LoRA", ratio(("LoRA", "upcycle LoRA-MoE grouped"), ("LoRA", "dense peft LoRA")), 0.7)
    report("LoRA-MoE grouped / LoRA-MoE eager", ratio(("LoRA", "upcycle LoRA-MoE grouped"), ("LoRA", "upcycle LoRA-MoE eager")), None)


def report(label: str, value: float | None, goal: float | None) -> None:
    if value is None:
        print(f"  {label:48s} n/a")
        return
    verdict = "" if goal is None else f"  goal >= {goal:.1f}x: {'met' if value >= goal else 'NOT met'}"
    print(f"  {label:48s} {value:5.2f}x{verdict}")


if __name__ == "__main__":
    main()
