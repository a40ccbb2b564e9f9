"""Instruction data: schemas, chat templates, exact loss masks, packing, bad rows."""

import json

import pytest

from upcycle.config import DataSpec
from upcycle.data.build import build_datasets
from upcycle.data.dataset import Collator, pack
from upcycle.data.encode import IGNORE_INDEX, encode
from upcycle.data.instructions import load_conversations, to_conversation
from upcycle.errors import UpcycleError
from upcycle.tiny import char_tokenizer


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def plain_tok():
    t = char_tokenizer()
    t.chat_template = None
    return t


def ids_of(tok, pieces):
    """Token ids of a list of pieces: special tokens whole, other strings char by char."""
    out = []
    for p in pieces:
        if p in tok.all_special_tokens:
            out.append(tok.convert_tokens_to_ids(p))
        else:
            out += [tok.convert_tokens_to_ids(c) for c in p]
    return out


def test_alpaca_row_with_chat_template_masks_the_prompt(tok):
    conv = to_conversation({"instruction": "hi", "input": "x", "output": "ok"}, "alpaca", "t:1")
    enc, truncated = encode(conv, tok, max_length=100)
    prompt = ids_of(tok, ["<|im_start|>", "user\nhi\n\nx", "<|im_end|>", "\n", "<|im_start|>", "assistant\n"])
    response = ids_of(tok, ["ok", "<|im_end|>", "\n"])
    assert enc.input_ids == prompt + response
    assert enc.labels == [IGNORE_INDEX] * len(prompt) + response
    assert not truncated


def test_messages_schema_labels_every_assistant_turn(tok):
    row = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
                        {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
                        {"role": "assistant", "content": "d"}]}
    enc, _ = encode(to_conversation(row, "messages", "t:1"), tok, max_length=200)
    pieces = [("<|im_start|>", 0), ("system\nS", 0), ("<|im_end|>", 0), ("\n", 0),
              ("<|im_start|>", 0), ("user\na", 0), ("<|im_end|>", 0), ("\n", 0), ("<|im_start|>", 0), ("assistant\n", 0),
              ("b", 1), ("<|im_end|>", 1), ("\n", 1),
              ("<|im_start|>", 0), ("user\nc", 0), ("<|im_end|>", 0), ("\n", 0), ("<|im_start|>", 0), ("assistant\n", 0),
              ("d", 1), ("<|im_end|>", 1), ("\n", 1)]
    expected_ids, expected_labels = [], []
    for piece, learn in pieces:
        ids = ids_of(tok, [piece])
        expected_ids += ids
        expected_labels += ids if learn else [IGNORE_INDEX] * len(ids)
    assert enc.input_ids == expected_ids
    assert enc.labels == expected_labels


def test_plain_template_when_the_tokenizer_has_none(plain_tok):
    conv = to_conversation({"instruction": "hi", "output": "ok"}, "alpaca", "t:1")
    enc, _ = encode(conv, plain_tok, max_length=100)
    prompt = ids_of(plain_tok, ["<s>", "### Instruction:\nhi\n\n### Response:\n"])
    response = ids_of(plain_tok, ["ok", "</s>", "\n\n"])
    assert enc.input_ids == prompt + response
    assert enc.labels == [IGNORE_INDEX] * len(prompt) + response


def test_overlong_is_truncated_and_counted_or_refused(tok):
    conv = to_conversation({"instruction": "hi", "output": "a long answer"}, "alpaca", "f.jsonl:7")
    enc, truncated = encode(conv, tok, max_length=25)  # the prompt is 21 tokens: 4 response tokens remain
    assert truncated and len(enc.input_ids) == 25 and enc.labels[-4:] == enc.input_ids[-4:]
    assert tok.decode(enc.labels[-4:]) == "a lo"
    with pytest.raises(UpcycleError, match="f.jsonl:7: .* over data.max_length=25"):
        encode(conv, tok, max_length=25, overlong="error")
    # Truncated before any response token: nothing to learn, the sample is dropped.
    enc, truncated = encode(conv, tok, max_length=5)
    assert enc is None and truncated


def test_packing_keeps_samples_apart(tok):
    convs = [to_conversation({"instruction": "q", "output": str(i)}, "alpaca", f"t:{i}") for i in range(3)]
    samples = [encode(c, tok, 100)[0] for c in convs]
    n = len(samples[0])
    blocks = pack(samples, max_length=2 * n)
    assert len(blocks) == 2 and len(blocks[0]["input_ids"]) == 2 * n
    assert blocks[0]["position_ids"] == list(range(n)) * 2
    assert blocks[0]["labels"][n] == IGNORE_INDEX  # the second sample's first token is not a target
    batch = Collator(pad_token_id=0)(blocks)
    assert "attention_mask" not in batch
    assert batch["position_ids"][1].tolist() == list(range(n)) + list(range(n))  # padding is its own "sample"
    assert (batch["labels"][1, n:] == IGNORE_INDEX).all()


def test_padding_collator():
    batch = Collator(pad_token_id=9)([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4], "labels": [4]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 9, 9]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) if not isinstance(r, str) else r for r in rows) + "\n")
    return path


def test_bad_rows_error_with_file_and_line_or_are_skipped(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": ""},
                                              "{broken json", {"instruction": "e"}])
    with pytest.raises(UpcycleError, match=r"d.jsonl:2: empty 'output'"):
        load_conversations([path])
    convs, report = load_conversations([path], on_bad_row="skip")
    assert len(convs) == 1 and report.rows == 4
    assert sum(report.skipped.values()) == 3


def test_row_without_a_response(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "hello"}]}])
    with pytest.raises(UpcycleError, match=r"m.jsonl:1: no assistant response"):
        load_conversations([path])


def test_empty_dataset(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(UpcycleError, match="no usable rows"):
        load_conversations([tmp_path / "empty.jsonl"])


def test_unknown_schema(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(UpcycleError, match=r"x.jsonl:1: unknown schema \(keys \['answer', 'question'\]\)"):
        load_conversations([path])


def test_json_file_and_datasets_folder(tmp_path, tok):
    rows = [{"instruction": f"q{i}", "output": f"a{i}", "domain": "math"} for i in range(4)]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    convs, _ = load_conversations([tmp_path / "d.json"])
    assert [c.messages[1]["content"] for c in convs] == ["a0", "a1", "a2", "a3"] and convs[0].domain == "math"
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    convs2, _ = load_conversations([tmp_path / "ds"])
    assert [c.messages for c in convs2] == [c.messages for c in convs]


def test_build_datasets_reports_counts_and_split(tmp_path, tok):
    rows = [{"instruction": f"question {i}", "output": f"answer {i}"} for i in range(20)]
    write_jsonl(tmp_path / "d.jsonl", rows)
    spec = DataSpec(train=[str(tmp_path / "d.jsonl")], eval_fraction=0.25, max_length=64)
    data = build_datasets(spec, tok, seed=0)
    assert len(data.train) == 15 and len(data.eval) == 5
    assert data.train_report.samples == 15
    assert data.train_report.response_tokens == sum(
        sum(l != IGNORE_INDEX for l in data.train[i]["labels"]) for i in range(15))
    again = build_datasets(spec, tok, seed=0)
    assert [again.train[i]["input_ids"] for i in range(15)] == [data.train[i]["input_ids"] for i in range(15)]


def test_suite_data(tok):
    spec = DataSpec(train=["suite"], eval_fraction=0.0, max_length=256, suite={"train_per_domain": 5, "test_per_domain": 2})
    data = build_datasets(spec, tok, seed=0)
    assert data.train_report.samples == 20
    assert data.train_report.by_domain == {"code": 5, "math": 5, "knowledge": 5, "mc": 5}
