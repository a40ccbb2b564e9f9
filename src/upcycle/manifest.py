"""A stage's record on disk: which config made the folder, what is complete, with content hashes.

It is rewritten atomically (temporary file + rename) after each complete unit of work, so a kill
at any moment leaves either the old record or the new one, never a half-written one, and a
listed checkpoint is always a complete one. Under torchrun only rank 0 writes it (upcycle/distributed.py):
`save` does nothing on the other ranks, which `reload` what rank 0 wrote after waiting for it.

Each stage's manifest has one typed model below (`PrepareManifest`, `ExpandManifest`, ...): every
write is validated against it before it reaches the disk (a stage that writes a key the model does not
know fails at once, naming it), and every read validates the file and hands the reader typed fields
(`read_manifest`), so a hand-edited or foreign manifest is refused with the file and key named.

Paths in a manifest (and in the other records a stage writes beside it: lineage.json, the run's
results.json) that lie inside the run folder are stored relative to the folder of the file that
stores them (`stored_path`), so a run folder can be moved whole; every reader resolves them against
the folder where it found the file (`resolve_path`). The run folder is the parent of the stage's
folder (for a recipe's stage, `upcycle run`'s out). Paths outside it (the base model, the user's
data files) are stored absolute. Checkpoint entries (`path`) are relative to the stage's folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from upcycle.errors import UpcycleError
from upcycle.io.atomic import atomic_write_text
from upcycle.io.user_files import read_json_object

MANIFEST = "manifest.json"


def sha256_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def stored_path(path: str | Path, folder: str | Path, run_folder: str | Path | None = None) -> str:
    """How a record in `folder` stores `path`: relative to `folder` when it lies inside the run
    folder (default: `folder`'s parent), else absolute."""
    full, folder = os.path.abspath(path), os.path.abspath(folder)
    run = os.path.abspath(run_folder) if run_folder is not None else os.path.dirname(folder)
    if full == run or full.startswith(run.rstrip(os.sep) + os.sep):
        return Path(os.path.relpath(full, folder)).as_posix()
    return full


def resolve_path(stored: str | Path, folder: str | Path) -> Path:
    """A path read from a record found in `folder`: a relative one is relative to that folder."""
    return Path(os.path.normpath(Path(folder) / stored)) if not Path(stored).is_absolute() else Path(stored)


# ------------------------------------------------------------------------------ what each stage records


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CheckpointEntry(_Record):
    """One complete checkpoint (train/checkpoints.py lists it once its files are hashed); `path` is
    relative to the stage's folder; scores are added by per-checkpoint evaluation."""

    index: int
    step: int
    epoch: float
    path: str
    sha256: str
    train_loss: float | None = None
    eval_loss: float | None = None
    scores: dict[str, float] | None = None
    average: float | None = None
    scored_with: str | None = None                  # eval/checkpoints.py eval_signature of the scores


class StageManifest(_Record):
    stage: str
    config_hash: str
    complete: bool = False
    checkpoints: list[CheckpointEntry] = []


class TrainedStageManifest(StageManifest):
    """A stage that trains through the Trainer: its save plan, written when training starts."""

    planned: int | None = None
    steps_per_epoch: int | None = None
    save_steps: list[int] | None = None
    optimizer_steps: int | None = None              # taken when training ended
    trainable_parameters: int | None = None


class PrepareManifest(TrainedStageManifest):
    stage: Literal["prepare"]
    mode: Literal["lora", "full"]
    base: str
    base_source: dict[str, Any] | None = None       # models.ModelRef.record(): name as given, hub repo and commit
    train_report: dict[str, Any] | None = None     # data/encode.py DataReport: samples, tokens, truncated, ...


class PoolExpert(_Record):
    index: int
    origin: Literal["checkpoint", "child"]
    path: str
    sha256: str
    checkpoint: int | None = None                   # origin checkpoint: its index and epoch in prepare
    epoch: float | None = None


class ExpansionRound(_Record):
    round: int
    child: int
    parents: list[int] | dict[str, list[int]]     # per-layer parent choice: per layer
    alpha: float
    drop_p: float
    seed: int
    parent_choice: str
    metric: str
    similarity_before: list[list[float]]
    weights: str
    storage: str
    svd_relative_error_max: float | None = None     # LoRA children stored by SVD (lora_merge: delta_svd)
    svd_relative_error_mean: float | None = None
    cosine_to_mix: float | None = None              # the stored child vs the plain alpha-mix of its parents
    norm_kept: float | None = None                  # ||stored|| / ||merged||


class ExpandManifest(StageManifest):
    stage: Literal["expand"]
    base: str
    kind: Literal["lora", "ffn"]
    num_experts: int
    experts: list[PoolExpert]
    lineage: list[ExpansionRound] = []
    grams: dict[str, Any] | None = None             # per layer, kept so a resumed expansion need not recompute
    similarity: list[list[float]] | None = None
    diversity: dict[str, Any] | None = None         # routing/diversity.py: pool_diversity


class Bucket(_Record):
    size: int
    domains: dict[str, int]


class OwnerShare(_Record):
    top_k: list[float]
    top_1: list[float]
    tokens: int


class RouteManifest(TrainedStageManifest):
    stage: Literal["route"]
    expand: str
    owners: list[int] | None = None
    buckets: dict[str, Bucket] | None = None
    notes: list[str] = []
    share_before: OwnerShare | None = None
    share_after: OwnerShare | None = None
    diversity: dict[str, Any] | None = None         # routing/diversity.py: seed_diversity


class ExportSummary(_Record):
    format: str
    files: list[str]
    parameters: dict[str, int]


class PostTrainManifest(TrainedStageManifest):
    stage: Literal["post_train"]
    source: str
    export: ExportSummary | None = None
    expert_load_entropy: dict[str, Any] | None = None
    scores: dict[str, float] | None = None
    average: float | None = None
    scored_with: str | None = None


class BranchDomain(_Record):
    domain: str
    rows: int
    data: str
    data_sha256: str
    sources: list[str]
    expert: str
    mode: str
    epochs: float
    data_source: str
    seeds: list[str] | None = None                  # self-generated data: the real rows behind it


class BranchManifest(StageManifest):
    stage: Literal["branch"]
    base: str
    kind: Literal["lora", "ffn"] | None = None
    domains: list[BranchDomain] = []
    generated: dict[str, dict[str, Any]] = {}       # per domain: file, hash, asked/kept/dropped, seeds, generator
    generated_union: dict[str, Any] | None = None


class MixExpert(_Record):
    path: str
    origin: str


class MixManifest(StageManifest):
    stage: Literal["mix"]
    base: str
    kind: Literal["lora", "ffn"]
    experts: list[MixExpert]
    format: str | None = None
    files: list[str] | None = None
    parameters: dict[str, int] | None = None
    checks: list[dict[str, Any]] | None = None      # per expert: kind, drift (ffn) or base_model and rank (lora)
    routing: dict[str, Any] | None = None


MANIFEST_MODELS: dict[str, type[StageManifest]] = {
    "prepare": PrepareManifest, "expand": ExpandManifest, "route": RouteManifest, "post_train": PostTrainManifest,
    "branch": BranchManifest, "mix": MixManifest}


def validate_manifest(data: dict, stage: str, source: str | Path) -> StageManifest:
    """`data` as the stage's typed model; an error names the file and each bad key."""
    from upcycle.config_io import format_validation_error

    try:
        return MANIFEST_MODELS[stage].model_validate(data)
    except ValidationError as e:
        raise UpcycleError(*format_validation_error(e, str(source)),
                           f"{source}: not a {stage} manifest this version of upcycle writes; rerun the stage with --force "
                           "(or the recipe with --redo)") from None


def json_object(path: Path) -> dict | None:
    """The file's JSON object, or None where it holds something else (invalid JSON, a list, binary)."""
    try:
        return read_json_object(path)
    except UpcycleError:
        return None


def read_manifest(folder: str | Path, stage: str | tuple[str, ...], complete: bool = True):
    """The typed manifest of the `stage` stage in `folder` (for a stage that reads another's output;
    a tuple accepts any of those stages); with `complete`, an unfinished stage is refused."""
    folder = Path(folder)
    path = folder / MANIFEST
    stages = (stage,) if isinstance(stage, str) else tuple(stage)
    wanted = " or ".join(stages)
    if not path.is_file():
        raise UpcycleError(f"{wanted} {folder}: no {MANIFEST}; run `upcycle {stages[0].replace('_', '-')}` first")
    data = json_object(path)
    if data is None:
        raise UpcycleError(f"{path}: not a JSON object (hand-edited, or a broken write?); rerun the {wanted} "
                           "stage with --force")
    found = data.get("stage")
    if found not in stages:
        raise UpcycleError(f"{wanted} {folder}: {MANIFEST} belongs to a {found} stage, not {wanted}; check the path")
    record = validate_manifest(data, found, path)
    if complete and not record.complete:
        raise UpcycleError(f"{found} {folder}: the {found} stage has not finished; rerun it to complete")
    return record


PROGRESS_KEYS = ("checkpoints", "lineage", "owners", "domains", "generated")
"""Manifest keys that list finished units of work: checkpoints, expansion rounds, seed buckets,
branch experts, generated data."""


def holds_finished_work(folder: Path) -> bool:
    """Whether a stage folder or a run folder, at any depth (a branch stage's per-domain prepare runs),
    records a finished unit of work that a rerun would resume from: such a folder is never removed
    after a failure."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    for path in folder.rglob(MANIFEST):
        record = json_object(path)
        if record and (record.get("complete") or any(record.get(k) for k in PROGRESS_KEYS)):
            return True
    return False


class Manifest:
    """The record a stage is writing: a dict (`data`) that is validated against the stage's typed
    model on every `save` and when an existing folder is reopened."""

    def __init__(self, folder: Path, data: dict[str, Any]):
        self.folder = Path(folder)
        self.data = data

    @classmethod
    def open(cls, folder: str | Path, stage: str, config_hash: str, force: bool = False,
             initial: dict | None = None, inputs: list | tuple = ()) -> "Manifest":
        """The folder's manifest for this stage and config, or a new one in an empty folder.

        `inputs` are what the stage reads (upcycle/io/atomic.py's `claim_output`: the folder may not
        be, hold or lie inside one, --force or not). A folder made by another config is refused
        unless `force`, which clears it first (an upcycle folder only, unless --force-foreign).
        Temporaries a killed run of this folder left are removed.
        """
        from upcycle.io.atomic import claim_output, clear_stale_temporaries_in, make_output_dir

        folder = Path(folder)
        claim_output(folder, inputs, force, resumable=True)
        path = folder / MANIFEST
        if path.is_file():
            data = json_object(path)
            if data is None and not force:
                raise UpcycleError(f"{path}: not a JSON object (hand-edited, or a broken write?); pass --force "
                                   f"to start the {stage} stage over")
            if data is not None and data.get("stage") == stage and data.get("config_hash") == config_hash:
                validate_manifest(data, stage, path)
                clear_stale_temporaries_in(folder)
                return cls(folder, data)
            if not force:
                raise UpcycleError(
                    f"out {folder}: made by a different {data.get('stage')} config (hash {data.get('config_hash')}, "
                    f"now {config_hash}); choose another out, or pass --force to start over")
            shutil.rmtree(folder)
        elif folder.is_dir() and any(folder.iterdir()):
            shutil.rmtree(folder)  # claim_output allowed it: --force on an upcycle folder (or --force-foreign)
        make_output_dir(folder)
        m = cls(folder, {"stage": stage, "config_hash": config_hash, "complete": False, "checkpoints": [], **(initial or {})})
        m.save()
        return m

    def save(self) -> None:
        from upcycle.distributed import is_main

        validate_manifest(self.data, self.data["stage"], self.folder / MANIFEST)  # a bug: a key the model lacks
        if is_main():
            atomic_write_text(self.folder / MANIFEST, json.dumps(self.data, indent=2, default=str))

    def reload(self) -> "Manifest":
        """What rank 0 wrote (call it once every rank has waited for rank 0)."""
        self.data = json.loads((self.folder / MANIFEST).read_text())
        return self

    @property
    def checkpoints(self) -> list[dict]:
        return self.data["checkpoints"]

    @property
    def complete(self) -> bool:
        return bool(self.data.get("complete"))

    def add_checkpoint(self, entry: dict) -> None:
        self.checkpoints.append(entry)
        self.save()
