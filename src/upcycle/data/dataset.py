"""Encoded samples as a torch Dataset, with padding or packing collation and a token report.

Bucketing (the default) is HF Trainer's `group_by_length`: batches of similar lengths, padded.
Packing concatenates samples into blocks of at most `max_length` tokens with position ids that
restart per sample and no attention mask; transformers then keeps samples from attending to
each other (packed-sequence masks), and the first token of each sample is not a target.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.data import Dataset

from upcycle.data.encode import IGNORE_INDEX, Encoded, encode, template_name
from upcycle.data.instructions import Conversation
from upcycle.errors import UpcycleError


@dataclass
class DataReport:
    samples: int = 0
    tokens: int = 0
    response_tokens: int = 0
    truncated: int = 0
    dropped_no_response: int = 0
    blocks: int | None = None
    by_domain: dict = field(default_factory=dict)
    chat_template: str = ""  # which template rendered the conversations (data/encode.py: template_name)

    def summary(self) -> str:
        s = (f"{self.samples} samples, {self.tokens} tokens ({self.response_tokens} in responses)"
             f", {self.truncated} truncated, {self.dropped_no_response} dropped (no response left after truncation)")
        if self.blocks is not None:
            s += f", packed into {self.blocks} blocks"
        if self.chat_template:
            s += f"; chat template: {self.chat_template}"
        return s


class InstructionDataset(Dataset):
    def __init__(self, samples: list[Encoded | dict]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        s = self.samples[i]
        if isinstance(s, Encoded):
            return {"input_ids": s.input_ids, "labels": s.labels}
        return s


def encode_all(convs: list[Conversation], tokenizer, max_length: int, overlong: str) -> tuple[list[Encoded], DataReport]:
    report = DataReport(chat_template=template_name(tokenizer))
    out = []
    for conv in convs:
        enc, truncated = encode(conv, tokenizer, max_length, overlong)
        report.truncated += truncated
        if enc is None:
            report.dropped_no_response += 1
            continue
        out.append(enc)
        report.tokens += len(enc)
        report.response_tokens += sum(l != IGNORE_INDEX for l in enc.labels)
        if enc.meta.get("domain"):
            report.by_domain[enc.meta["domain"]] = report.by_domain.get(enc.meta["domain"], 0) + 1
    report.samples = len(out)
    if not out:
        raise UpcycleError("data: every sample was dropped (no response tokens within data.max_length)")
    return out, report


def pack(samples: list[Encoded], max_length: int) -> list[dict]:
    """Greedy, order-preserving packing into blocks of at most max_length tokens."""
    blocks, ids, labels, pos = [], [], [], []
    for s in samples:
        if ids and len(ids) + len(s) > max_length:
            blocks.append({"input_ids": ids, "labels": labels, "position_ids": pos})
            ids, labels, pos = [], [], []
        ids = ids + s.input_ids
        labels = labels + [IGNORE_INDEX] + s.labels[1:]  # no target across the sample boundary
        pos = pos + list(range(len(s)))
    if ids:
        blocks.append({"input_ids": ids, "labels": labels, "position_ids": pos})
    return blocks


@dataclass
class Collator:
    """Pads a batch on the right. Packed blocks get position ids instead of an attention mask."""

    pad_token_id: int

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        packed = "position_ids" in features[0]
        batch = {"input_ids": [], "labels": []}
        batch["position_ids" if packed else "attention_mask"] = []
        for f in features:
            n, gap = len(f["input_ids"]), width - len(f["input_ids"])
            batch["input_ids"].append(list(f["input_ids"]) + [self.pad_token_id] * gap)
            batch["labels"].append(list(f["labels"]) + [IGNORE_INDEX] * gap)
            if packed:  # padding forms its own "sample", so nothing attends to it
                batch["position_ids"].append(list(f["position_ids"]) + list(range(gap)))
            else:
                batch["attention_mask"].append([1] * n + [0] * gap)
        out = {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
        for key in features[0]:  # per-sample integer fields (e.g. the route stage's bucket owner)
            if key not in ("input_ids", "labels", "position_ids", "attention_mask"):
                out[key] = torch.tensor([f[key] for f in features], dtype=torch.long)
        return out
