"""Score a model on the built-in suite's test items, per domain.

Generation domains (code, math, knowledge) use greedy decoding on the chat-formatted prompt in
left-padded batches; multiple choice compares the summed log-likelihood of each option as the
assistant's answer (lm-eval's `acc`). Scores are fractions in [0, 1].
"""

from __future__ import annotations

import inspect
from collections import defaultdict

import torch
from tqdm.auto import tqdm

from upcycle.data.encode import render
from upcycle.devices import to_model_device
from upcycle.eval.scorers import score_code, score_exact, score_number
from upcycle.suite.tasks import DOMAINS, Item

MAX_NEW_TOKENS = {"code": 48, "math": 6, "knowledge": 12}


def new_token_budget(item: Item) -> int:
    """Greedy tokens for the item's domain: its mix's own budget if it carries one (suite/smol.py)."""
    return getattr(item, "max_new_tokens", 0) or MAX_NEW_TOKENS[item.domain]


def prompt_text(tokenizer, item: Item) -> str:
    return render(tokenizer, [{"role": "user", "content": item.prompt}], add_generation_prompt=True)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 32, progress: bool = False,
             desc: str = "generating") -> list[str]:
    """Greedy completions, without the prompt; stops at the tokenizer's end-of-turn (eos) token.

    The key/value cache is asked for explicitly: a model just out of the Trainer has
    `config.use_cache=False` (TrainingArguments.use_cache), and generating without the cache re-runs
    the whole sequence at every new token (the SmolLM2 post-train evaluation took twice as long)."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outs = []
    try:
        for i in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not progress, unit="batch"):
            batch = to_model_device(tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True,
                                              add_special_tokens=False), model)
            gen = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            outs += tokenizer.batch_decode(gen[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return outs


def cache_argument(model) -> str:
    """The forward argument (and output field) that carries the key/value cache: transformers 5 renamed
    `past_key_values` to `cache` in later releases; the old name still works there, with a warning."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def option_logliks(model, tokenizer, prompt: str, options: list[str]) -> list[float]:
    """Sum of log-probabilities of each option's tokens after the prompt (lm-eval's `acc` sums)."""
    return batch_option_logliks(model, tokenizer, [prompt], [options])[0]


@torch.no_grad()
def batch_option_logliks(model, tokenizer, prompts: list[str], options: list[list[str]]) -> list[list[float]]:
    """`option_logliks` for several items in two forward passes.

    The prompts run once, left-padded into one batch, with position ids counted from each prompt's
    first real token (so padding changes nothing but float rounding); their key/value cache is then
    copied to one row per option, and all options run as one right-padded batch. Only the positions
    that score an option token get logits. Tested against one full forward per option.
    """
    prefixes = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    conts = [[tokenizer(o, add_special_tokens=False)["input_ids"] for o in opts] for opts in options]
    for prompt, prefix, opts, cs in zip(prompts, prefixes, options, conts):
        if not prefix or not cs or not all(cs):
            raise ValueError(f"multiple choice needs a non-empty prompt and options; got prompt {prompt!r}, "
                             f"options {opts!r}")
    pad = tokenizer.pad_token_id or 0
    width = max(map(len, prefixes))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prefixes])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prefixes])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    ids, mask, positions = to_model_device((ids, mask, positions), model)
    first = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    first_logp = torch.log_softmax(first.logits[:, -1].float(), dim=-1)
    scores = [[first_logp[i, c[0]].item() for c in cs] for i, cs in enumerate(conts)]
    rows = [(i, k, c) for i, cs in enumerate(conts) for k, c in enumerate(cs)]  # one row per option
    cont_width = max(len(c) for _, _, c in rows)
    if cont_width == 1:
        return scores
    name = cache_argument(model)
    cache = getattr(first, name)
    owner = torch.tensor([i for i, _, _ in rows])
    cache.batch_select_indices(owner.to(ids.device))
    cont_ids = torch.tensor([c[:-1] + [pad] * (cont_width - len(c)) for _, _, c in rows])
    cont_mask = torch.tensor([[1] * (len(c) - 1) + [0] * (cont_width - len(c)) for _, _, c in rows])
    cont_positions = torch.tensor([[len(prefixes[i]) + j for j in range(cont_width - 1)] for i, _, _ in rows])
    cont_ids, cont_mask, cont_positions = to_model_device((cont_ids, cont_mask, cont_positions), model)
    logits = model(input_ids=cont_ids, attention_mask=torch.cat([mask[owner.to(mask.device)], cont_mask], dim=1),
                   position_ids=cont_positions, use_cache=True, **{name: cache}).logits
    logp = torch.log_softmax(logits.float(), dim=-1)   # position j scores option token j + 1
    for row, (i, k, c) in enumerate(rows):
        scores[i][k] += sum(logp[row, j, c[j + 1]].item() for j in range(len(c) - 1))
    return scores


def evaluate_items(model, tokenizer, items: list[Item], progress: bool = False, batch_size: int = 32) -> dict:
    """{'scores': {domain: fraction}, 'average': ..., 'outputs': [per item]}"""
    model.eval()
    per_domain: dict[str, list[float]] = defaultdict(list)
    outputs = []
    by_domain = defaultdict(list)
    for item in items:
        by_domain[item.domain].append(item)
    for domain in [d for d in DOMAINS if d in by_domain]:
        todo = by_domain[domain]
        if domain == "mc":
            for start in tqdm(range(0, len(todo), batch_size), desc="mc", disable=not progress):
                chunk = todo[start:start + batch_size]
                logliks = batch_option_logliks(model, tokenizer, [prompt_text(tokenizer, i) for i in chunk],
                                               [i.options for i in chunk])
                for item, ll in zip(chunk, logliks):
                    choice = max(range(len(ll)), key=ll.__getitem__)
                    per_domain[domain].append(float(choice == item.correct))
                    outputs.append({"domain": domain, "prompt": item.prompt, "output": item.options[choice],
                                    "score": per_domain[domain][-1]})
            continue
        texts = generate(model, tokenizer, [prompt_text(tokenizer, i) for i in todo], new_token_budget(todo[0]), batch_size,
                         progress=progress, desc=f"{domain}: generating")
        for item, text in tqdm(list(zip(todo, texts)), desc=f"{domain}: scoring", disable=not progress):
            if domain == "code":
                score, _ = score_code(text, item.tests)
            elif domain == "math":
                score = score_number(text, item.target)
            else:
                score = score_exact(text, item.target)
            per_domain[domain].append(score)
            outputs.append({"domain": domain, "prompt": item.prompt, "output": text, "score": score})
    scores = {d: sum(v) / len(v) for d, v in per_domain.items()}
    return {"scores": scores, "average": sum(scores.values()) / len(scores), "outputs": outputs}
