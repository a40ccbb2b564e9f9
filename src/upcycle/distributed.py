"""Several processes (`torchrun --nproc_per_node N`): the one policy every stage follows.

Every rank runs the same pipeline; what each does with a piece of work is decided here, once:

    stage       every rank                    rank 0 only, others wait          sharded across ranks
    ---------   ---------------------------   -------------------------------   ----------------------------
    (all)       load data, tokenizer, model   check inputs, open/clear folders,  -
                (after rank 0 checked them)   write manifests, run.json, lock
    prepare     the Trainer's training        -                                 per-checkpoint suite scoring
                                                                                 (by checkpoint)
    branch      each domain's training        domain data files                 -
    expand      -                             the whole stage (rounds are       -
                                              sequential: a child may be the
                                              next round's parent)
    route       the Trainer's router training routers / MoE export, plots       PPL scoring (by batch of
                                                                                 samples), owner share
    mix         -                             the whole stage                   -
    post_train  the Trainer's training        export, expert-load entropy,      -
                                              suite scoring

Waiting. Ranks never wait for rank 0's work in a collective of the Trainer's process group (NCCL
ends those after its timeout, 30 minutes, while scoring or expanding an 8B pool can take longer).
Every wait and gather goes through a separate gloo group whose timeout is `WAIT_TIMEOUT` (days):
a blocking socket read, no busy polling, no GPU memory. If rank 0 dies, its sockets close and the
waiting ranks fail at once ("Connection closed by peer"); torchrun also ends every rank when one
exits non-zero. `init` makes both groups (NCCL for CUDA tensors and gloo for CPU ones on GPUs,
gloo on CPU), before the Trainer, which then uses the default group it finds.

Errors are shown once:
    rank-0 work (`on_rank_zero_then_wait`, `rank_zero_first`): rank 0 raises its error; the waiting
        ranks get its outcome and stop with `PeerFailed` (exit 2, nothing printed).
    sharded work (`map_sharded`): every rank's outcome is gathered; the lowest failing rank raises
        its error, the others stop silently.
    the Trainer's training: a rank that fails prints its error and exits; torchrun then ends the
        others (SIGTERM). Input errors are found before it, on rank 0 (the data, the model).
Outputs are written by rank 0 alone (`Manifest.save` is a no-op elsewhere), so a rerun after a
SIGKILL of any rank resumes from what rank 0 listed. Waits through the shared file system are not
used: several nodes need only the run folder shared, as the Trainer's checkpoints already do.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Callable, Sequence, TypeVar

import torch

from upcycle.errors import UpcycleError

T = TypeVar("T")
R = TypeVar("R")
WAIT_TIMEOUT = timedelta(days=7)  # a wait for rank 0's (or a slower shard's) work: no timeout in practice
TRAINER_TIMEOUT = timedelta(seconds=1800)  # the default group's, as TrainingArguments.ddp_timeout
_groups: dict[str, object] = {}


class PeerFailed(UpcycleError):
    """Another rank failed and has shown its error: this rank stops without repeating it (exit 2)."""

    def __init__(self):
        super().__init__()  # no problems: the CLI prints nothing


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def init() -> None:
    """Under torchrun: the default process group (if the Trainer has not made it) and the wait group.
    Every rank calls it at the start of a run or stage command (it is collective; later calls do nothing)."""
    if world_size() == 1 or "wait" in _groups:
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():
            from upcycle.devices import accelerator
            torch.cuda.set_device(accelerator())
        dist.init_process_group(backend="cuda:nccl,cpu:gloo" if torch.cuda.is_available() else "gloo",
                                timeout=TRAINER_TIMEOUT)
    _groups["wait"] = dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT)


def _broadcast(value=None):
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0, group=_groups["wait"])
    return box[0]


def gather(value) -> list:
    """Every rank's `value`, in rank order, on every rank (through the wait group)."""
    if world_size() == 1:
        return [value]
    import torch.distributed as dist

    init()
    out = [None] * world_size()
    dist.all_gather_object(out, value, group=_groups["wait"])
    return out


def on_rank_zero_then_wait(fn: Callable[[], T], share: bool = True) -> T:
    """Run `fn` on rank 0 while the other ranks wait; every rank returns rank 0's result (pickled
    across: keep it small; `share=False` returns None elsewhere). A failure on rank 0 stops the others."""
    if world_size() == 1:
        return fn()
    init()
    if is_main():
        try:
            result = fn()
        except BaseException:
            _broadcast(("failed", None))
            raise
        _broadcast(("ok", result if share else None))
        return result
    status, result = _broadcast()
    if status != "ok":
        raise PeerFailed()
    return result


def rank_zero_first(fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0, then on every other rank: each has its own result (a dataset, a model),
    and an error every rank would hit (bad data) is raised by rank 0 alone."""
    result = on_rank_zero_then_wait(fn, share=False)
    return result if is_main() else fn()


def shard(items: Sequence[T]) -> list[int]:
    """The indices of `items` this rank takes: rank, rank + world, ... (round robin, balanced)."""
    return list(range(rank(), len(items), world_size()))


def map_sharded(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """[fn(x) for x in items], each rank computing its `shard`, the results gathered on every rank.
    A failure on any rank is raised by the lowest failing rank only; the others raise PeerFailed."""
    if world_size() == 1:
        return [fn(x) for x in items]
    mine: dict[int, R] = {}
    error: BaseException | None = None
    for i in shard(items):
        try:
            mine[i] = fn(items[i])
        except Exception as e:  # reported after the gather, so no rank waits for a dead one
            error = e
            break
    outcomes = gather((mine, error is not None))
    failed = [r for r, (_, bad) in enumerate(outcomes) if bad]
    if failed:
        if failed[0] == rank():
            raise error
        raise PeerFailed()
    merged: dict[int, R] = {}
    for part, _ in outcomes:
        merged.update(part)
    return [merged[i] for i in range(len(items))]


def barrier() -> None:
    """Wait for every rank (through the wait group: no timeout risk)."""
    gather(None)
