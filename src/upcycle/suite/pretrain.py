"""Pre-train the suite's small Llama base on the suite's raw-text corpus, so UpIT starts from a model
that knows the world's facts, arithmetic and some Python, but has never seen an instruction.

    python -m upcycle.suite.pretrain --out src/upcycle/suite/base     # ~25 min on 2 CPU cores

The result is committed to the repository (a few MB) and loaded by `bundled:suite-base`; this
script is how it was made. Same seed, same machine type: same weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import torch

from upcycle.config import TrainSpec
from upcycle.suite.tasks import Suite, corpus
from upcycle.tiny import CHATML_TEMPLATE

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
MODEL = dict(vocab_size=1024, hidden_size=192, intermediate_size=512, num_hidden_layers=6, num_attention_heads=6,
             num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, rms_norm_eps=1e-5)
BLOCK = 256


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE with one token per digit (arithmetic needs digits, not number chunks)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>", pad_token="<pad>",
                                   unk_token=None, additional_special_tokens=["<|im_start|>", "<|endoftext|>"])
    fast.chat_template = CHATML_TEMPLATE
    return fast


def blocks(docs: list[str], tokenizer, size: int) -> list[list[int]]:
    sep = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    stream: list[int] = []
    for d in docs:
        stream += tokenizer(d, add_special_tokens=False)["input_ids"] + [sep]
    return [stream[i:i + size] for i in range(0, len(stream) - size + 1, size)]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--epochs", type=float, default=60)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer

    from upcycle.train.engine import training_arguments

    docs = corpus()
    suite = Suite(seed=0)
    instruction_texts = [f"{i.prompt}\n{i.answer}" for i in suite.train + suite.test]
    tokenizer = train_tokenizer(docs + instruction_texts, MODEL["vocab_size"])
    data = blocks(docs, tokenizer, BLOCK)
    config = LlamaConfig(**MODEL, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    train = TrainSpec(epochs=args.epochs, lr=2e-3, scheduler="cosine", warmup_ratio=0.02, batch_size=8, logging_steps=50)
    out = Path(args.out)
    dataset = [{"input_ids": b, "labels": b} for b in data]

    def collate(rows):
        return {k: torch.tensor([r[k] for r in rows]) for k in ("input_ids", "labels")}

    trainer = Trainer(model=model, args=training_arguments(train, out / "_trainer", args.seed, packing=True),
                      train_dataset=dataset, data_collator=collate)
    start = time.time()
    result = trainer.train()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    corpus_hash = hashlib.sha256("\n".join(docs).encode()).hexdigest()[:16]
    (out / "pretraining.json").write_text(json.dumps({
        "corpus_documents": len(docs), "corpus_sha256": corpus_hash, "blocks": len(data), "block_size": BLOCK,
        "epochs": args.epochs, "final_train_loss": result.training_loss, "seconds": round(time.time() - start),
        "parameters": sum(p.numel() for p in model.parameters()), "command": "python -m upcycle.suite.pretrain",
    }, indent=2))
    import shutil
    shutil.rmtree(out / "_trainer", ignore_errors=True)


if __name__ == "__main__":
    main()
