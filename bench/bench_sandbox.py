"""Sandbox overhead per program (issue 13; goal: at most 0.3 s over a plain subprocess).

Times, per program, (a) a plain `python -I -S -c pass` subprocess, (b) `run_program` of a trivial
program and test in the isolated sandbox (bwrap: namespaces, fresh tmpfs, harness, report pipe),
and (c) the same unisolated (the opt-in fallback), each the median of --runs; prints the figures,
the overhead (b - a) and the ratio b / a. As root, the sandbox's bwrap runs as `nobody`.

    .venv/bin/python bench/bench_sandbox.py [--runs 30]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from upcycle.eval import sandbox  # noqa: E402

PROGRAM, TESTS = "def add(a, b):\n    return a + b\n", ["assert add(2, 3) == 5"]


def median_seconds(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    iso = sandbox.isolation()
    if isinstance(iso, str):
        sys.exit(f"no isolation on this machine: {iso}")
    iso_python = iso.python

    def isolated():
        assert sandbox.run_program(PROGRAM, TESTS).all_passed

    def unisolated():
        assert sandbox.run_program(PROGRAM, TESTS, allow_unsafe=True).all_passed

    isolated()  # warm the page cache
    plain = median_seconds(lambda: subprocess.run([iso_python, "-I", "-S", "-c", "pass"], check=True), args.runs)
    boxed = median_seconds(isolated, args.runs)
    sandbox.isolation.cache_clear()
    real = sandbox._bwrap_candidates
    sandbox._bwrap_candidates = lambda: []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bare = median_seconds(unisolated, args.runs)
    sandbox._bwrap_candidates = real
    sandbox.isolation.cache_clear()
    result = {"user": "root (bwrap as nobody)" if os.geteuid() == 0 else "ordinary user", "python": iso_python,
              "bwrap": iso.bwrap, "runs": args.runs, "plain_subprocess_s": round(plain, 4),
              "isolated_run_program_s": round(boxed, 4), "unisolated_run_program_s": round(bare, 4),
              "overhead_s": round(boxed - plain, 4), "ratio": round(boxed / plain, 2),
              "goal_overhead_s": 0.3, "within_goal": boxed - plain <= 0.3}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
