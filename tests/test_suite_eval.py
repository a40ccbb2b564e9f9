"""Multiple-choice log-likelihoods of the built-in suite: the shared-prompt cache path against one full
forward per option, on a dense model and on an upcycled MoE (the reference never calls the code under test)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from upcycle.config import BuildConfig, MoESpec
from upcycle.eval.suite_eval import batch_option_logliks, option_logliks
from upcycle.stages import build

PROMPT = "Which city is the capital of the country whose flag has a maple leaf on it? Answer:"
OPTIONS = ["Ottawa", "Toronto and Montreal", "a", " Vancouver"]  # the tiny tokenizer spells by character


def full_forward_logliks(model, tokenizer, prompt, options):
    """lm-eval's definition: each option appended to the prompt, one forward each, summed log-probs."""
    prefix = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    sums = []
    for option in options:
        cont = tokenizer(option, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prefix + cont])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
        sums.append(sum(logp[len(prefix) + j - 1, t].item() for j, t in enumerate(cont)))
    return sums


@pytest.fixture(scope="module")
def moe_dir(llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("suite_eval") / "moe"
    build.run(BuildConfig(base=llama_dir, out=out, moe=MoESpec(num_experts=4, top_k=2, router_init_std=0.3)),
              progress=False)
    return out


@pytest.mark.parametrize("which", ["dense", "peft", "moe"])
def test_option_logliks_equal_one_full_forward_per_option(which, llama_dir, moe_dir):
    """dense and MoE as exported; peft as stage 1 scores its LoRA checkpoints (non-zero adapters)."""
    folder = moe_dir if which == "moe" else llama_dir
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if which == "peft":
        from peft import LoraConfig, get_peft_model
        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["up_proj", "down_proj"],
                                                 init_lora_weights=False)).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    lengths = {len(tokenizer(o, add_special_tokens=False)["input_ids"]) for o in OPTIONS}
    assert len(lengths) >= 3 and 1 in lengths  # options of different lengths, one of a single token
    ours = option_logliks(model, tokenizer, PROMPT, OPTIONS)
    reference = full_forward_logliks(model, tokenizer, PROMPT, OPTIONS)
    assert ours == pytest.approx(reference, abs=1e-4)
    assert len(set(round(x, 3) for x in reference)) == len(OPTIONS)  # the comparison can tell options apart
    # several items in one batch: prompts of different lengths (left padding), option counts and lengths
    prompts = [PROMPT, "Pick one:", PROMPT[:40]]
    options = [OPTIONS, ["b", "Toronto"], OPTIONS[1:]]
    batched = batch_option_logliks(model, tokenizer, prompts, options)
    for prompt, opts, got in zip(prompts, options, batched):
        assert got == pytest.approx(full_forward_logliks(model, tokenizer, prompt, opts), abs=1e-4), prompt


def test_single_token_options_and_empty_option(llama_dir):
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    single = [o for o in ("a", "b", "c") if len(tokenizer(o, add_special_tokens=False)["input_ids"]) == 1]
    assert single, "the tiny tokenizer has single-token letters"
    assert option_logliks(model, tokenizer, PROMPT, single) == pytest.approx(
        full_forward_logliks(model, tokenizer, PROMPT, single), abs=1e-4)
    with pytest.raises(ValueError, match="options"):
        option_logliks(model, tokenizer, PROMPT, ["a", ""])


def test_generation_uses_the_cache_even_when_training_switched_it_off(llama_dir):
    """After the Trainer, config.use_cache is False and generation_config may follow it; greedy
    generation must still feed one new token per step (not the whole sequence again)."""
    from upcycle.eval.suite_eval import generate

    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    model.config.use_cache = False
    model.generation_config.use_cache = False
    model.generation_config.eos_token_id = None  # run every step
    widths = []
    hook = model.model.register_forward_pre_hook(lambda m, args, kw: widths.append(kw["input_ids"].shape[1]),
                                                 with_kwargs=True)
    try:
        generate(model, tokenizer, ["abc", "abcdef"], max_new_tokens=4)
    finally:
        hook.remove()
    assert len(widths) == 4 and widths[0] > 1 and widths[1:] == [1, 1, 1], widths
