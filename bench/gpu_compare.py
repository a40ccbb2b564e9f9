"""Compare a recipe run on the GPU (bf16) with the same config run on the CPU (fp32): part of
scripts/gpu_check.sh (issue 10), never of the tests.

    python bench/gpu_compare.py RUN_CPU RUN_GPU [--tolerance 0.10]

Both exported models are loaded on the CPU in fp32 and fed the same token sequences. Training in
bf16 is not bit-compatible with fp32 (rounding of every step compounds), so the check is a stated
tolerance, not equality: the mean absolute logit difference relative to the CPU logits' standard
deviation must be <= --tolerance (default 0.10), and greedy next tokens must agree on >= 90 % of
positions. Prints both, with the suite scores of each run when they were evaluated; exit 1 if
either bound fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def exported_model(run: Path) -> Path:
    """The model folder a run exported last (post_train's, else the last stage's `model`)."""
    for stage in ("post_train", "route", "prepare"):
        folder = run / stage / "model"
        if (folder / "config.json").is_file():
            return folder
    raise SystemExit(f"{run}: no exported model folder (post_train/model, route/model or prepare/model)")


def logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    from upcycle.export.load import load_moe

    model = load_moe(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("cpu_run", type=Path)
    ap.add_argument("gpu_run", type=Path)
    ap.add_argument("--tolerance", type=float, default=0.10)
    ap.add_argument("--agreement", type=float, default=0.90)
    args = ap.parse_args()
    cpu_model, gpu_model = exported_model(args.cpu_run), exported_model(args.gpu_run)
    vocab = json.loads((cpu_model / "config.json").read_text())["vocab_size"]
    ids = torch.randint(0, vocab, (4, 48), generator=torch.Generator().manual_seed(0))
    ref, got = logits(cpu_model, ids), logits(gpu_model, ids)
    relative = ((got - ref).abs().mean() / ref.std()).item()
    agreement = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    scores = {}
    for name, run in (("cpu fp32", args.cpu_run), ("gpu bf16", args.gpu_run)):
        results = run / "results.json"
        scores[name] = json.loads(results.read_text()).get("scores") if results.is_file() else None
    ok = relative <= args.tolerance and agreement >= args.agreement
    print(json.dumps({"cpu_model": str(cpu_model), "gpu_model": str(gpu_model), "mean_abs_logit_diff_over_std": round(relative, 4),
                      "greedy_agreement": round(agreement, 4), "tolerance": args.tolerance, "agreement_bound": args.agreement,
                      "scores": scores, "ok": ok}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
