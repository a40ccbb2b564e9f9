"""Conversations -> token ids with labels: the loss is on the assistant's tokens only.

The conversation is rendered with the tokenizer's chat template (or a plain one when it has
none). Each assistant turn's character span is found by rendering the conversation up to that
turn with and without it; tokens whose characters start inside a span keep their id as label,
all others get -100. The span includes the template's end-of-turn marker, so the model learns
to stop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from upcycle.data.instructions import Conversation
from upcycle.errors import UpcycleError

IGNORE_INDEX = -100
PLAIN_TEMPLATE = (
    "{{ bos_token if bos_token else '' }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
    "{% else %}{{ '### Response:\n' + message['content'] + (eos_token if eos_token else '') + '\n\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
)


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    source: str
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.input_ids)


def chat_template(tokenizer) -> str:
    return tokenizer.chat_template or PLAIN_TEMPLATE


def template_name(tokenizer) -> str:
    """Which template renders the data, in words, for the run's report and manifest."""
    import hashlib

    if not tokenizer.chat_template:
        return "upcycle's plain fallback (### Instruction / ### Response; the tokenizer has no chat template)"
    digest = hashlib.sha256(tokenizer.chat_template.encode()).hexdigest()[:12]
    return f"the tokenizer's own (sha256 {digest})"


def render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=chat_template(tokenizer), tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: list[dict], source: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the [start, end) character spans of every assistant turn."""
    full = render(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        upto = render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (upto.startswith(prefix) and full.startswith(upto)):
            raise UpcycleError(f"data {source}: the chat template does not render conversations prefix by prefix, "
                               "so the response tokens cannot be located; use a standard template")
        spans.append((len(prefix), len(upto)))
    return full, spans


def encode(conv: Conversation, tokenizer, max_length: int,
           overlong: Literal["truncate", "error"] = "truncate") -> tuple[Encoded | None, bool]:
    """(encoded sample or None if nothing is left to learn, whether it was truncated)."""
    text, spans = assistant_spans(tokenizer, conv.messages, conv.source)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [IGNORE_INDEX] * len(ids)
    for t, (start, end) in enumerate(enc["offset_mapping"]):
        if end > start and any(s <= start < e for s, e in spans):
            labels[t] = ids[t]
    truncated = len(ids) > max_length
    if truncated:
        if overlong == "error":
            raise UpcycleError(f"data {conv.source}: {len(ids)} tokens, over data.max_length={max_length} "
                               "(raise max_length, or set data.overlong=truncate)")
        ids, labels = ids[:max_length], labels[:max_length]
    if all(l == IGNORE_INDEX for l in labels):
        return None, truncated
    return Encoded(ids, labels, conv.source, dict(conv.meta)), truncated
