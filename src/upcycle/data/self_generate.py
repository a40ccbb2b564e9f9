"""Self-specialization (Self-MoE, Kang et al. 2024; SPEC section 6): the base model writes a domain's
training data itself, from a few seed examples of that domain.

The story, per domain:
  1. seeds: `seed_per_domain` rows drawn (seeded) from that domain's training split, nothing else;
  2. instruction brainstorming: a few-shot prompt of `shots` seed instructions (a fresh seeded draw
     per prompt) ending in an open "### Instruction:" slot; the base completes it, and the text up to
     the next "\\n###" (or EOS, or any other special token) is the new instruction;
  3. response generation: a few-shot prompt of the same seeds as instruction/response pairs, then
     the new instruction and an open "### Response:" slot; the text up to the next "\\n### Instruction:"
     or "\\n### Response:" (or EOS, or any other special token) is the response;
  4. filtering: a pair is dropped when either part is empty, did not end within `max_new_tokens`
     (unterminated: cut mid-thought) or had no room for them in the base's context (too_long), or
     when its instruction repeats a seed's or a kept one's (after lower-casing and collapsing
     whitespace); every drop is counted by reason.
Where the paper is silent (or its text was not at hand), the choices here are: the prompt wording
and "###" format, the terminators, exact-match deduplication (self-instruct uses ROUGE-L), and
training each expert on its generated pairs only (the seeds are not added).
Prompts are plain text (the base is not assumed to follow a chat template, as in the paper, whose
bases are pre-trained models); the kept pairs are written as `messages` rows with their `domain`,
so the expert trains on them through the chat template exactly as on given rows.

Determinism: each prompt's seed draw comes from (seed, domain, prompt index) and each generate()
call samples under torch's RNG forked and seeded from (seed, domain, part, batch index), so a
domain's pairs depend on the seed and the settings alone, not on other domains or a resume.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

import torch

from upcycle.data.instructions import Conversation
from upcycle.errors import UpcycleError
from upcycle.seeding import derive_seed

INSTRUCTION = "### Instruction:\n"
RESPONSE = "### Response:\n"
INSTRUCTION_END = ("\n###",)  # the model opens the next section (its response, or another instruction)
# the model starts another example, or answers again; a response may hold other "###" headings (markdown)
RESPONSE_END = ("\n### Instruction:", "\n### Response:")


@dataclass(frozen=True)
class Seed:
    instruction: str
    response: str
    source: str  # "file:line" of the training row


@dataclass(frozen=True)
class Settings:
    shots: int = 3
    max_new_tokens: int = 256
    temperature: float = 0.7  # 0: greedy
    top_p: float = 0.9
    batch_size: int = 8
    max_tries: int = 4

    @classmethod
    def of(cls, cfg) -> "Settings":
        """The generation knobs of a BranchConfig."""
        return cls(cfg.shots, cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.generate_batch_size, cfg.max_tries)


@dataclass
class Report:
    prompts: int = 0  # prompts sent (instruction brainstorming)
    kept: int = 0
    surplus: int = 0  # good pairs generated in the last batch beyond the count asked for
    dropped: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return {"prompts": self.prompts, "kept": self.kept, "surplus": self.surplus, "dropped": dict(sorted(self.dropped.items()))}


def seed_of(conv: Conversation) -> Seed:
    """The first user turn and the assistant turn that answers it (a system turn is not part of a seed)."""
    for i, m in enumerate(conv.messages):
        if m["role"] == "user":
            answer = next((a for a in conv.messages[i + 1:] if a["role"] == "assistant"), None)
            if answer is not None:
                return Seed(m["content"].strip(), answer["content"].strip(), conv.source)
    raise UpcycleError(f"data {conv.source}: no user turn followed by an assistant turn, so it cannot be a "
                       "self-generation seed; fix the row or use branch.data_source=given")


def pick_seeds(convs: list[Conversation], count: int, seed: int, domain: str) -> list[Seed]:
    """`count` of one domain's training rows, drawn without replacement from (seed, domain)."""
    if count > len(convs):
        raise UpcycleError(f"branch.seed_per_domain: {count} is more than domain {domain!r}'s {len(convs)} training "
                           f"rows; lower it to at most {len(convs)} or add rows of that domain")
    picked = random.Random(derive_seed(seed, "self_generate", "seeds", domain)).sample(range(len(convs)), count)
    return [seed_of(convs[i]) for i in picked]


def instruction_prompt(domain: str, shots: list[Seed]) -> str:
    head = f"New tasks in the domain \"{domain}\".\n\n"
    return head + "".join(f"{INSTRUCTION}{s.instruction}\n\n" for s in shots) + INSTRUCTION


def response_prompt(domain: str, shots: list[Seed], instruction: str) -> str:
    head = f"Tasks in the domain \"{domain}\", each with its response.\n\n"
    examples = "".join(f"{INSTRUCTION}{s.instruction}\n\n{RESPONSE}{s.response}\n\n" for s in shots)
    return head + examples + f"{INSTRUCTION}{instruction}\n\n{RESPONSE}"


def cut(text: str, terminators: tuple[str, ...], ended: bool) -> tuple[str | None, str | None]:
    """(the text before the first terminator, None) or (None, why it is unusable). `ended`: generation
    stopped at EOS, so the text is complete even without a terminator."""
    found = [at for at in (text.find(t) for t in terminators) if at >= 0]
    if found:
        text, ended = text[:min(found)], True
    if not ended:
        return None, "unterminated"
    text = text.strip()
    return (text, None) if text else (None, "empty")


def normalized(text: str) -> str:
    return " ".join(text.lower().split())


class _StopAt:
    """Stops a row once a terminator appears in its new tokens (the last few decoded, enough to hold one:
    only a saving, the completion is cut again from its whole text)."""

    def __init__(self, tokenizer, start: int, terminators: tuple[str, ...]):
        self.tokenizer, self.start, self.terminators = tokenizer, start, terminators
        self.window = max(map(len, terminators)) + 4  # a token is rarely less than one character

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        tails = self.tokenizer.batch_decode(input_ids[:, self.start:][:, -self.window:], skip_special_tokens=True)
        return torch.tensor([any(x in t for x in self.terminators) for t in tails], dtype=torch.bool,
                            device=input_ids.device)


def eos_ids(model, tokenizer) -> list[int]:
    """The tokens that end a completion: EOS (the tokenizer's and the model's generation_config's) and every
    other special token (end of turn, a document separator such as <|endoftext|>): in a plain-text prompt a
    control token means the model has left the format."""
    configured = getattr(model.generation_config, "eos_token_id", None)
    configured = configured if isinstance(configured, (list, tuple)) else [configured]
    return sorted({i for i in [tokenizer.eos_token_id, *configured, *tokenizer.all_special_ids] if i is not None})


def complete(model, tokenizer, prompts: list[str], terminators: tuple[str, ...], s: Settings, seed: int,
             *names: object) -> list[tuple[str | None, str | None]]:
    """Each prompt's completion cut at its first terminator (or EOS), or None with the reason (a prompt that leaves
    no room for max_new_tokens in the base's context is not sent: too_long). One generate() call, every
    sampling knob set here (none taken from the model's generation_config), under a forked, seeded RNG."""
    from transformers import GenerationConfig, StoppingCriteriaList

    limit = getattr(model.config, "max_position_embeddings", None)
    lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]]
    fits = [limit is None or n + s.max_new_tokens <= limit for n in lengths]
    if not any(fits):
        return [(None, "too_long")] * len(prompts)
    tokenizer.padding_side = "left"
    enc = tokenizer([p for p, ok in zip(prompts, fits) if ok], return_tensors="pt", padding=True)
    start = enc["input_ids"].shape[1]
    eos = eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    sample = s.temperature > 0
    knobs = dict(temperature=s.temperature, top_p=s.top_p, top_k=0) if sample else {}  # greedy reads none of them
    gen = GenerationConfig(max_new_tokens=s.max_new_tokens, do_sample=sample, num_beams=1, repetition_penalty=1.0,
                           eos_token_id=eos or None, pad_token_id=pad, **knobs)
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items()}
    # generate() samples from torch's global RNG (it takes no generator): fork it, seed it from the names
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        torch.manual_seed(derive_seed(seed, *names))
        out = model.generate(**enc, generation_config=gen,
                             stopping_criteria=StoppingCriteriaList([_StopAt(tokenizer, start, terminators)]))
    done = []
    for row in out[:, start:].tolist():
        ended = any(t in eos for t in row)
        if ended:
            row = row[: min(row.index(t) for t in eos if t in row)]
        done.append(cut(tokenizer.decode(row, skip_special_tokens=True), terminators, ended))
    done.reverse()
    return [done.pop() if ok else (None, "too_long") for ok in fits]


def generate_domain(model, tokenizer, domain: str, seeds: list[Seed], count: int, s: Settings,
                    seed: int) -> tuple[list[dict], Report]:
    """Up to `count` new (instruction, response) rows for `domain`, written by `model` from `seeds`,
    and what was dropped. Stops at `count` kept or `max_tries * count` prompts."""
    report = Report()
    seen = {normalized(x.instruction) for x in seeds}
    rows: list[dict] = []
    budget = s.max_tries * count
    batch = 0
    while len(rows) < count and report.prompts < budget:
        first = report.prompts
        n = min(s.batch_size, budget - first)
        shots = [[seeds[i] for i in random.Random(derive_seed(seed, "self_generate", domain, "shots", first + j))
                  .sample(range(len(seeds)), s.shots)] for j in range(n)]
        report.prompts += n
        asked = complete(model, tokenizer, [instruction_prompt(domain, sh) for sh in shots], INSTRUCTION_END, s,
                         seed, "self_generate", domain, "instruction", batch)
        todo = []
        for sh, (instruction, why) in zip(shots, asked):
            if why:
                report.dropped[f"instruction_{why}"] += 1
            elif normalized(instruction) in seen:
                report.dropped["duplicate"] += 1
            else:
                seen.add(normalized(instruction))
                todo.append((sh, instruction))
        answers = complete(model, tokenizer, [response_prompt(domain, sh, ins) for sh, ins in todo], RESPONSE_END, s,
                           seed, "self_generate", domain, "response", batch) if todo else []
        for (_, instruction), (response, why) in zip(todo, answers):
            if why:
                report.dropped[f"response_{why}"] += 1
            elif len(rows) == count:
                report.surplus += 1
            else:
                rows.append({"messages": [{"role": "user", "content": instruction},
                                          {"role": "assistant", "content": response}],
                             "domain": domain, "origin": "self_generated"})
        batch += 1
    report.kept = len(rows)
    if not rows:
        raise UpcycleError(f"branch.data_source: self_generated kept no pair for domain {domain!r} from {report.prompts} "
                           f"prompts (dropped: {dict(report.dropped)}); raise branch.max_new_tokens or branch.max_tries, "
                           "or use branch.data_source=given")
    return rows, report
