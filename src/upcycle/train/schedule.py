"""The learning-rate schedule of every training stage, as plain math, and the scheduler made from it.

Two differences from transformers' schedulers, both for short stages and for UpIT:

- Warmup never trains at learning rate 0. transformers' linear warmup gives step 0 a factor of
  0/w, and rounds a warmup ratio up (ceil), so a one-step stage (a small seed set, one epoch)
  takes its only step at lr 0 and nothing moves. Here step s < w gets (s + 1) / (w + 1), and
  w = floor(ratio * horizon): a stage of any length takes every step at a non-zero rate.
- A horizon longer than the stage (`train.schedule_epochs`): the schedule runs as if training
  lasted that many epochs and the stage stops part way down it. UpIT's stage 1 is the first half of
  a 4-epoch budget (2 epochs stage 1 + 2 post-training); annealed to 0 within its own 2 epochs its
  last checkpoints are near copies (task-vector cosine 0.9997 on SmolLM2), while a horizon of the
  whole budget keeps the rate at half its peak when stage 1 ends, so later checkpoints still move.
"""

from __future__ import annotations

import math


def schedule_horizon(total_steps: int, epochs: float, schedule_epochs: float | None) -> int:
    """Optimizer steps the schedule spans: the stage's own, or those of `schedule_epochs` epochs."""
    if schedule_epochs is None or schedule_epochs <= epochs:
        return total_steps
    return math.ceil(total_steps * schedule_epochs / epochs)


def warmup_steps(ratio: float, horizon: int) -> int:
    return math.floor(ratio * horizon)


def lr_factor(step: int, kind: str, warmup: int, horizon: int) -> float:
    """The multiplier of the peak learning rate at optimizer step `step` (0-based)."""
    if kind == "constant":
        return 1.0
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant_with_warmup":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, horizon - warmup))
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine


def make_scheduler(optimizer, kind: str, warmup_ratio: float, total_steps: int, epochs: float,
                   schedule_epochs: float | None = None):
    """A LambdaLR over the factors above (its state, the step count, resumes with the Trainer's)."""
    from torch.optim.lr_scheduler import LambdaLR

    horizon = schedule_horizon(total_steps, epochs, schedule_epochs)
    warmup = warmup_steps(warmup_ratio, horizon)
    return LambdaLR(optimizer, lambda step: lr_factor(step, kind, warmup, horizon))
