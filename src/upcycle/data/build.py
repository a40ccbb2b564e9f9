"""From `DataSpec` to train and eval datasets: load, split, encode, pack, and report counts."""

from __future__ import annotations

import random
from dataclasses import dataclass

from upcycle.config import DataSpec
from upcycle.data.dataset import DataReport, InstructionDataset, encode_all, pack
from upcycle.data.instructions import Conversation, LoadReport, load_conversations, to_conversation

SUITE = "suite"


@dataclass
class Datasets:
    train: InstructionDataset
    eval: InstructionDataset | None
    load_report: LoadReport
    train_report: DataReport
    eval_report: DataReport | None
    train_conversations: list[Conversation]

    def summary(self) -> str:
        s = f"train: {self.load_report.summary()}; {self.train_report.summary()}"
        if self.eval_report:
            s += f"\neval: {self.eval_report.summary()}"
        return s


def load_spec_conversations(paths: list[str], spec: DataSpec) -> tuple[list[Conversation], LoadReport]:
    if paths == [SUITE]:
        from upcycle.suite.mixes import make_suite

        suite = make_suite(spec.suite)
        convs = [to_conversation(row, "alpaca", f"suite:train[{i}]", spec.system_prompt)
                 for i, row in enumerate(suite.rows("train"))]
        report = LoadReport(rows=len(convs), conversations=len(convs))
        return convs, report
    return load_conversations(paths, spec.schema_, spec.on_bad_row, spec.system_prompt, spec.columns)


def build_datasets(spec: DataSpec, tokenizer, seed: int) -> Datasets:
    convs, load_report = load_spec_conversations(spec.train, spec)
    eval_convs: list[Conversation] = []
    if spec.eval:
        eval_convs, _ = load_spec_conversations(spec.eval, spec)
    elif spec.eval_fraction > 0 and len(convs) > 1:
        order = list(range(len(convs)))
        random.Random(f"eval-split:{seed}").shuffle(order)
        n_eval = max(1, round(spec.eval_fraction * len(convs)))
        held = set(order[:n_eval])
        eval_convs = [c for i, c in enumerate(convs) if i in held]
        convs = [c for i, c in enumerate(convs) if i not in held]
    if spec.limit:
        convs = convs[: spec.limit]
    train_samples, train_report = encode_all(convs, tokenizer, spec.max_length, spec.overlong)
    train_items = train_samples
    if spec.packing:
        train_items = pack(train_samples, spec.max_length)
        train_report.blocks = len(train_items)
    eval_ds, eval_report = None, None
    if eval_convs:
        eval_samples, eval_report = encode_all(eval_convs, tokenizer, spec.max_length, spec.overlong)
        eval_ds = InstructionDataset(eval_samples)
    return Datasets(InstructionDataset(train_items), eval_ds, load_report, train_report, eval_report, convs)
