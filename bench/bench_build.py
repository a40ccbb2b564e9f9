"""Benchmark: one-shot `copy` upcycle of SmolLM2-135M into 8 experts (fp32), upcycle vs mergekit-moe.

    .venv/bin/python bench/bench_build.py [--skip-mergekit] [--repeats 2]

Both tools run on the same input in the same run, each in its own process; the figures are wall
time and peak RSS of that process (os.wait4), plus a plain 2.8 GB file write as the disk's floor.
mergekit 0.1.5 is installed into bench/.venv-mergekit on first use (it is not a dependency).
Goals (issue 2): peak RSS <= 1.5 GB and wall time <= 0.5 x mergekit's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MERGEKIT_VENV = ROOT / "bench" / ".venv-mergekit"
EXPERTS = 8


def measure(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of one command, run in its own process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"command failed: {' '.join(cmd)}\n{proc.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def ensure_mergekit() -> Path:
    exe = MERGEKIT_VENV / "bin" / "mergekit-moe"
    if not exe.exists():
        print("installing mergekit==0.1.5 into bench/.venv-mergekit (once) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(MERGEKIT_VENV)], check=True)
        subprocess.run([str(MERGEKIT_VENV / "bin" / "pip"), "install", "-q", "torch==2.13.0", "mergekit==0.1.5"], check=True)
    return exe


def mergekit_config(base: Path, path: Path) -> Path:
    experts = "\n".join(f"  - source_model: {base}\n    positive_prompts: [\"expert {i}\"]" for i in range(EXPERTS))
    path.write_text(f"base_model: {base}\ngate_mode: random\ndtype: float32\nexperts:\n{experts}\n")
    return path


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def write_floor(path: Path, nbytes: int) -> float:
    """Seconds to write nbytes to a file with fsync: what any tool needs at least for this output."""
    block = os.urandom(1 << 24)
    start = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(nbytes // len(block)):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - start
    path.unlink()
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--repeats", type=int, default=2, help="runs per tool; the best wall time is reported")
    args = ap.parse_args()

    sys.path.insert(0, str(ROOT / "src"))
    from upcycle.bundled import smollm2_dir

    base = smollm2_dir()
    work = Path(tempfile.mkdtemp(prefix="bench-build-", dir=ROOT / "bench"))
    rows = []
    try:
        upcycle_cmd = [str(ROOT / ".venv" / "bin" / "upcycle"), "build", "--base", str(base), "--out", str(work / "upcycle"),
                       "--num-experts", str(EXPERTS), "--top-k", "2", "--init", "copy", "--dtype", "float32",
                       "--quiet", "--force"]
        tools = [("upcycle build", upcycle_cmd, work / "upcycle")]
        if not args.skip_mergekit:
            exe = ensure_mergekit()
            cfg = mergekit_config(base, work / "mergekit.yaml")
            tools.append(("mergekit-moe 0.1.5", [str(exe), str(cfg), str(work / "mergekit"), "--i-understand-this-is-not-useful-without-training",
                                               "--no-write-model-card"], work / "mergekit"))
        for name, cmd, out in tools:
            runs = []
            for _ in range(args.repeats):
                shutil.rmtree(out, ignore_errors=True)
                runs.append(measure(cmd))
            size = dir_bytes(out)
            rows.append((name, min(r[0] for r in runs), max(r[1] for r in runs), size))
            print(f"{name:22s} wall {min(r[0] for r in runs):6.1f} s   peak RSS {max(r[1] for r in runs):6.0f} MB   "
                  f"output {size / 1e9:.2f} GB   (runs: {', '.join(f'{r[0]:.1f}s' for r in runs)})", flush=True)
        floor = write_floor(work / "floor.bin", rows[0][3])
        print(f"{'write floor':22s} wall {floor:6.1f} s   (writing {rows[0][3] / 1e9:.2f} GB with fsync)")
        ours = rows[0]
        print(f"\ngoal peak RSS <= 1500 MB: {ours[2]:.0f} MB -> {'met' if ours[2] <= 1500 else 'NOT met'}")
        if len(rows) > 1:
            ratio = ours[1] / rows[1][1]
            print(f"goal wall <= 0.5 x mergekit: ratio {ratio:.2f} -> {'met' if ratio <= 0.5 else 'NOT met'}; "
                  f"memory ratio {ours[2] / rows[1][2]:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
