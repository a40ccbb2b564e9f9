"""`upcycle demo`: upcycle the bundled SmolLM2-135M-Instruct into an MoE, reload it with stock
transformers, and chat with it.

    ./scripts/demo.sh            (or: upcycle demo --workdir runs/demo)

The build runs in a child process so its peak memory is measured alone (not the conversion's or
the chat's).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

QUESTION = "What is the capital of France? Answer in one sentence."


def _chat(model, tokenizer, question: str, max_new_tokens: int = 40) -> str:
    import torch

    messages = [{"role": "user", "content": question}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def _routing_table(model, tokenizer, text: str, layers: list[int]) -> list[str]:
    """Share of top-k assignments each expert gets, per layer, for the tokens of `text`."""
    import torch

    from upcycle.moe.losses import expert_load

    ids = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        out = model(**ids, output_router_logits=True)
    k = model.config.num_experts_per_tok
    rows = []
    for l in layers:
        load = expert_load(out.router_logits[l], k)
        rows.append(f"  layer {l:2d}: " + " ".join(f"{100 * x:4.0f}%" for x in load.tolist()))
    return rows


def run(args) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from upcycle.bundled import smollm2_dir

    workdir = Path(args.workdir)
    out = workdir / "smollm2-moe"
    print("== upcycle demo: SmolLM2-135M-Instruct -> Mixture-of-Experts ==", flush=True)
    base = smollm2_dir()
    print(f"base model: {base}")

    cmd = [sys.executable, "-m", "upcycle.cli", "build", "--base", str(base), "--out", str(out), "--force", "--json",
           "--quiet", "--num-experts", str(args.num_experts), "--top-k", str(args.top_k), "--init", args.init]
    print("$ upcycle build " + " ".join(cmd[4:]), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(proc.returncode)
    s = json.loads(proc.stdout)
    p = s["parameters"]
    print(f"  experts      {s['experts']} per layer x {s['moe_layers']} layers, top-{s['top_k']}, routing {s['routing']}, init {s['init']}")
    print(f"  parameters   dense {s['dense_parameters'] / 1e6:.1f}M -> {p['total'] / 1e6:.1f}M total, {p['active'] / 1e6:.1f}M active per token")
    print(f"  format       {s['format']} ({len(s['files'])} safetensors file(s), {s['bytes'] / 1e9:.2f} GB)")
    print(f"  time         {s['seconds']:.1f} s;  peak memory {s['peak_rss_mb']:.0f} MB (RSS of the build process)")

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(out)
    moe = AutoModelForCausalLM.from_pretrained(out).eval()
    print(f"reloaded with stock transformers as {type(moe).__name__} in {time.perf_counter() - t0:.1f} s")
    dense = AutoModelForCausalLM.from_pretrained(base).eval()

    ids = tokenizer("Upcycling turns a dense model into a mixture of experts.", return_tensors="pt")
    with torch.no_grad():
        diff = (moe(**ids).logits - dense(**ids).logits).abs().max().item()
    print(f"max |logit difference| MoE vs dense on a test sentence: {diff:.2e}"
          + ("  (copy init + top-k softmax preserves the function)" if args.init == "copy" else ""))

    print(f"\nuser: {QUESTION}")
    t0 = time.perf_counter()
    answer = _chat(moe, tokenizer, QUESTION)
    print(f"MoE:   {answer}   [{time.perf_counter() - t0:.1f} s]")
    print(f"dense: {_chat(dense, tokenizer, QUESTION)}")

    n = moe.config.num_hidden_layers
    print("\nrouting of the answer's tokens (share of top-k slots per expert; random routers before training):")
    for row in _routing_table(moe, tokenizer, answer or QUESTION, [0, n // 2, n - 1]):
        print(row)
    print(f"\noutput: {out} (load it with AutoModelForCausalLM.from_pretrained)")
