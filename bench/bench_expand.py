"""Benchmark: `upcycle expand` 4 -> 8 experts from SmolLM2-135M-sized full checkpoints (>= 2 GB on disk).

    .venv/bin/python bench/bench_expand.py

Four stand-in stage-1 checkpoints are made once from the bundled SmolLM2-135M (its weights plus
seeded noise on every MLP matrix, 538 MB each) under bench/.cache/, with a prepare manifest. The
expand stage then runs in its own process; reported: wall time, peak RSS (os.wait4), bytes of
experts read per round, and what the pool would take in memory if loaded whole (the reference
for the streaming claim). Goal (issue 4): peak RSS <= 1 GB.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
CACHE = ROOT / "bench" / ".cache" / "expand-checkpoints"


def make_checkpoints(base: Path) -> Path:
    from safetensors.torch import load_file, save_file

    manifest = CACHE / "manifest.json"
    if manifest.is_file():
        return CACHE
    shutil.rmtree(CACHE, ignore_errors=True)
    state = load_file(base / "model.safetensors")
    entries = []
    for i in range(4):
        g = torch.Generator().manual_seed(i)
        noisy = {k: (v + 0.01 * torch.randn(v.shape, generator=g) if ".mlp." in k else v) for k, v in state.items()}
        ck = CACHE / "checkpoints" / f"checkpoint-{i}"
        ck.mkdir(parents=True)
        save_file(noisy, ck / "model.safetensors", metadata={"format": "pt"})
        entries.append({"index": i, "step": i + 1, "epoch": (i + 1) / 2, "path": f"checkpoints/checkpoint-{i}", "sha256": str(i)})
        del noisy
    manifest.write_text(json.dumps({"stage": "prepare", "complete": True, "base": str(base), "checkpoints": entries}))
    return CACHE


def main() -> None:
    from upcycle.bundled import smollm2_dir

    base = smollm2_dir()
    prep = make_checkpoints(base)
    ckpt_bytes = sum(f.stat().st_size for f in prep.rglob("*.safetensors"))
    work = Path(tempfile.mkdtemp(prefix="bench-expand-", dir=ROOT / "bench"))
    try:
        cmd = [str(ROOT / ".venv" / "bin" / "upcycle"), "expand", "--prepare", str(prep), "--out", str(work / "out"),
               "--num-experts", "8", "--quiet", "checkpoints=all"]
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(proc.stderr.read().decode()[-3000:])
        manifest = json.loads((work / "out" / "manifest.json").read_text())
        mlp_bytes = sum(f.stat().st_size for f in (work / "out" / "experts").rglob("*.safetensors")) // 4  # per child
        print(f"input: 4 full checkpoints, {ckpt_bytes / 1e9:.2f} GB on disk; MLP task vectors {mlp_bytes / 1e6:.0f} MB per expert")
        print(f"expand 4 -> 8: wall {wall:.1f} s, peak RSS {usage.ru_maxrss / 1024:.0f} MB, "
              f"{len(manifest['lineage'])} children, parents {[r['parents'] for r in manifest['lineage']]}")
        print(f"reference: the whole final pool in fp32 would be {8 * mlp_bytes / 1e9:.2f} GB of task vectors")
        print(f"goal peak RSS <= 1024 MB: {'met' if usage.ru_maxrss / 1024 <= 1024 else 'NOT met'}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
