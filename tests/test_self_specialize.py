"""Self-MoE's self-specialization (`branch.data_source: self_generated`): the base writes each
domain's data from seed rows of that domain; each expert trains on its domain's generated file."""

import hashlib
import json
from pathlib import Path

import pytest
import torch

from upcycle.cli import main
from upcycle.data import self_generate as sg
from upcycle.manifest import resolve_path

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "self_moe_selfgen.yaml"
TINY = ["data.max_length=64", "data.eval_fraction=0.1", "evaluate=false", "post_train.train.batch_size=4",
        "post_train.train.epochs=0.5", "post_train.save_every=0.5", "branch.train.epochs=1", "branch.train.batch_size=8"]
DOMAINS = ("math", "code")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("selfgen-data") / "train.jsonl"
    rows = [{"instruction": f"add {i} and {i + 1}", "output": f"{2 * i + 1}", "domain": DOMAINS[i % 2]} for i in range(40)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny(llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(llama_dir).eval(), AutoTokenizer.from_pretrained(llama_dir)


SEEDS = [sg.Seed(f"add {i} and {i + 1}", f"{2 * i + 1}", f"x:{i}") for i in range(5)]


def test_cut_keeps_the_text_before_the_first_terminator_and_names_each_failure():
    assert sg.cut(" add 2 and 3 \n### Response:\n5", ("\n###",), ended=False) == ("add 2 and 3", None)
    assert sg.cut("add 2 and 3 and", ("\n###",), ended=False) == (None, "unterminated")  # ran out of tokens
    assert sg.cut("add 2 and 3", ("\n###",), ended=True) == ("add 2 and 3", None)  # stopped at EOS
    assert sg.cut(" \n \n### Instruction:", ("\n###",), ended=False) == (None, "empty")
    # a response keeps its own markdown headings and ends where the model answers again or asks anew
    text = "Steps:\n### Step 1\nadd\n### Response:\nagain\n### Instruction:\nmore"
    assert sg.cut(text, sg.RESPONSE_END, ended=False) == ("Steps:\n### Step 1\nadd", None)


def test_prompts_are_few_shot_over_the_given_seeds_only():
    assert sg.instruction_prompt("math", SEEDS[:2]) == (
        'New tasks in the domain "math".\n\n### Instruction:\nadd 0 and 1\n\n### Instruction:\nadd 1 and 2\n\n'
        "### Instruction:\n")
    assert sg.response_prompt("math", SEEDS[3:4], "add 7 and 8") == (
        'Tasks in the domain "math", each with its response.\n\n### Instruction:\nadd 3 and 4\n\n### Response:\n7\n\n'
        "### Instruction:\nadd 7 and 8\n\n### Response:\n")


def test_greedy_completion_equals_a_hand_rolled_greedy_decode(tiny):
    """complete() with temperature 0 against argmax decoding written out token by token."""
    model, tok = tiny
    prompt = sg.instruction_prompt("math", SEEDS[4:])  # one whose greedy completion ends within 100 tokens
    s = sg.Settings(shots=1, max_new_tokens=100, temperature=0.0)
    ids, new = tok(prompt)["input_ids"], []
    ended = False
    with torch.no_grad():
        for _ in range(s.max_new_tokens):
            t = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
            if t in tok.all_special_ids:  # EOS, or any control token: the end of a plain-text completion
                ended = True
                break
            new.append(t)
            if "\n###" in tok.decode(new, skip_special_tokens=True):
                break
    text = tok.decode(new, skip_special_tokens=True)
    expected = (text[:text.index("\n###")].strip() or None) if "\n###" in text else (text.strip() if ended else None)
    assert expected  # a kept instruction, not two failures compared
    assert sg.complete(model, tok, [prompt], ("\n###",), s, 0, "t") == [(expected, None)]


def test_generation_is_deterministic_for_a_seed_and_leaves_the_global_rng_alone(tiny):
    model, tok = tiny
    s = sg.Settings(shots=1, max_new_tokens=64, batch_size=16, max_tries=8)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = sg.generate_domain(model, tok, "math", SEEDS, 3, s, seed=0)
    assert torch.equal(torch.rand(3), expected_next)  # sampling ran under a forked RNG
    b = sg.generate_domain(model, tok, "math", SEEDS, 3, s, seed=0)
    c = sg.generate_domain(model, tok, "math", SEEDS, 3, s, seed=1)
    assert a[0] == b[0] and a[1].as_dict() == b[1].as_dict()
    assert a[0] != c[0]
    rows, report = a
    assert 1 <= len(rows) == report.kept <= 3
    # every prompt is accounted for: kept, surplus, or dropped for one named reason
    assert report.prompts == report.kept + report.surplus + sum(report.dropped.values())
    instructions = [" ".join(r["messages"][0]["content"].lower().split()) for r in rows]
    assert len(set(instructions)) == len(instructions)
    assert not set(instructions) & {x.instruction for x in SEEDS}


def test_a_domain_that_keeps_nothing_is_an_error_naming_the_drops(tiny):
    model, tok = tiny
    with pytest.raises(Exception, match=r"kept no pair for domain 'math' from 2 prompts \(dropped: \{'instruction_unterminated': 2\}"):
        sg.generate_domain(model, tok, "math", SEEDS, 1, sg.Settings(shots=1, max_new_tokens=1, max_tries=2), seed=0)


@pytest.fixture(scope="module")
def selfgen_run(llama_dir, tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("selfgen") / "run"
    code = main(["run", str(RECIPE), "--quiet", f"base={llama_dir}", f"data.train=[{tiny_data}]", f"out={out}", *TINY])
    assert code == 0
    return out


def _training_split(tiny_data):
    """The rows the branch stage trains from: the project's loader with the recipe's split (eval_fraction 0.1)."""
    from upcycle.config import DataSpec
    from upcycle.data.build import build_datasets
    from upcycle.tiny import char_tokenizer

    spec = DataSpec(train=[str(tiny_data)], max_length=64, eval_fraction=0.1)
    return {c.source for c in build_datasets(spec, char_tokenizer(), 0).train_conversations}


def test_selfgen_recipe_runs_end_to_end_and_experts_train_on_generated_data(selfgen_run):
    import yaml

    out = selfgen_run
    record = json.loads((out / "run.json").read_text())
    assert list(record["stages"]) == ["branch", "mix", "post_train"]
    assert all(s["status"] == "done" for s in record["stages"].values())
    for domain in ("code", "math"):  # each expert's training data is its domain's generated file, nothing else
        cfg = yaml.safe_load((out / "branch" / "experts" / domain / "upcycle_config.yaml").read_text())
        assert cfg["data"]["train"] == [str(out / "branch" / "data" / f"{domain}.generated.jsonl")]
    assert (out / "post_train" / "model" / "upcycle_provenance.json").exists()


def test_router_trains_on_the_union_of_the_generated_data_and_the_card_says_so(selfgen_run):
    import yaml

    out = selfgen_run
    cfg = yaml.safe_load((out / "post_train" / "upcycle_config.yaml").read_text())
    union = out / "branch" / "data" / "generated.jsonl"
    assert cfg["data"]["train"] == [str(union)]
    parts = [(out / "branch" / "data" / f"{d}.generated.jsonl").read_text() for d in ("code", "math")]
    assert union.read_text() == "".join(parts)  # every domain's pairs, nothing else
    card = (out / "post_train" / "model" / "README.md").read_text()
    assert "self-moe" in card and "the base model wrote" in card


def test_generated_rows_have_their_domain_and_the_messages_schema(selfgen_run):
    from upcycle.data.instructions import load_conversations

    for domain in ("code", "math"):
        path = selfgen_run / "branch" / "data" / f"{domain}.generated.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert rows
        for r in rows:
            assert set(r) == {"messages", "domain", "origin"} and r["domain"] == domain and r["origin"] == "self_generated"
            assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
            assert all(isinstance(m["content"], str) and m["content"].strip() == m["content"] != "" for m in r["messages"])
        convs, report = load_conversations([path])  # the reader every stage uses takes every row
        assert report.conversations == len(rows) and {c.domain for c in convs} == {domain}


def test_seeds_are_training_rows_of_their_domain_only(selfgen_run, tiny_data):
    manifest = json.loads((selfgen_run / "branch" / "manifest.json").read_text())
    lines = tiny_data.read_text().splitlines()
    train = _training_split(tiny_data)
    for domain in ("code", "math"):
        seeds = manifest["generated"][domain]["seeds"]
        assert len(seeds) == len(set(seeds)) == 10  # the recipe's seed_per_domain
        assert set(seeds) <= train  # never a held-out eval row
        originals = [json.loads(lines[int(s.rsplit(":", 1)[1]) - 1]) for s in seeds]
        assert {r["domain"] for r in originals} == {domain}
        written = [json.loads(line) for line in (selfgen_run / "branch" / "data" / f"{domain}.seeds.jsonl").read_text().splitlines()]
        assert [(w["messages"][0]["content"], w["messages"][1]["content"]) for w in written] == \
               [(r["instruction"], r["output"]) for r in originals]


def test_manifest_records_the_lineage_of_each_generated_file(selfgen_run, tiny_data):
    manifest = json.loads((selfgen_run / "branch" / "manifest.json").read_text())
    train = _training_split(tiny_data)
    lines = tiny_data.read_text().splitlines()
    for entry in manifest["domains"]:
        domain = entry["domain"]
        gen = manifest["generated"][domain]
        path = selfgen_run / "branch" / "data" / f"{domain}.generated.jsonl"
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        kept = len(path.read_text().splitlines())
        assert gen["sha256"] == entry["data_sha256"] == digest and resolve_path(entry["data"], selfgen_run / "branch") == path
        assert gen["kept"] == entry["rows"] == kept and entry["data_source"] == "self_generated"
        # generate_per_domain: null asks for as many pairs as the domain has training rows
        assert gen["asked"] == sum(1 for s in train if json.loads(lines[int(s.rsplit(":", 1)[1]) - 1])["domain"] == domain)
        assert gen["prompts"] == gen["kept"] + gen["surplus"] + sum(gen["dropped"].values())
        assert gen["prompts"] <= 4 * gen["asked"]  # max_tries
        assert entry["seeds"] == gen["seeds"]
        seeds_file = selfgen_run / "branch" / "data" / f"{domain}.seeds.jsonl"
        assert gen["seeds_sha256"] == hashlib.sha256(seeds_file.read_bytes()).hexdigest()
        assert gen["generator"] == {"base": gen["generator"]["base"], "shots": 2, "max_new_tokens": 48,
                                    "temperature": 0.7, "top_p": 0.9, "batch_size": 16, "seed": 0}


class Killed(Exception):
    pass


def test_a_rerun_after_a_kill_does_not_regenerate_finished_domains(selfgen_run, llama_dir, tiny_data, tmp_path, monkeypatch):
    """Generation dies on the second domain; the rerun generates that one only, and both files equal
    an uninterrupted run's."""
    real, calls = sg.generate_domain, []

    def dies_on_math(model, tokenizer, domain, *args, **kwargs):
        calls.append(domain)
        if domain == "math":
            raise Killed()
        return real(model, tokenizer, domain, *args, **kwargs)

    monkeypatch.setattr(sg, "generate_domain", dies_on_math)
    out = tmp_path / "run"
    args = ["run", str(RECIPE), "--quiet", f"base={llama_dir}", f"data.train=[{tiny_data}]", f"out={out}", *TINY]
    with pytest.raises(Killed):
        main(args)
    code_file = out / "branch" / "data" / "code.generated.jsonl"
    listed = json.loads((out / "branch" / "manifest.json").read_text())["generated"]
    assert calls == ["code", "math"] and list(listed) == ["code"] and code_file.is_file()
    first = code_file.stat().st_mtime_ns

    calls.clear()
    monkeypatch.setattr(sg, "generate_domain", lambda m, t, domain, *a, **k: calls.append(domain) or real(m, t, domain, *a, **k))
    assert main(args) == 0
    assert calls == ["math"] and code_file.stat().st_mtime_ns == first
    for domain in ("code", "math"):
        name = f"branch/data/{domain}.generated.jsonl"
        assert (out / name).read_bytes() == (selfgen_run / name).read_bytes()


def test_more_seeds_than_a_domain_has_rows_is_refused_before_anything_is_written(llama_dir, tiny_data, tmp_path, capsys):
    out = tmp_path / "r"
    code = main(["run", str(RECIPE), "--quiet", f"base={llama_dir}", f"data.train=[{tiny_data}]", f"out={out}",
                 "branch.seed_per_domain=50", *TINY])
    err = capsys.readouterr().err
    lines = tiny_data.read_text().splitlines()
    code_rows = sum(1 for s in _training_split(tiny_data) if json.loads(lines[int(s.rsplit(":", 1)[1]) - 1])["domain"] == "code")
    assert code == 2 and f"branch.seed_per_domain: 50 is more than domain 'code''s {code_rows} training rows" in err
    assert len(err.strip().splitlines()) == 1
    assert not (out / "branch" / "data").exists()


def test_more_shots_than_seeds_is_refused(capsys):
    assert main(["validate", str(RECIPE), "branch.shots=11"]) == 2
    assert "branch.shots: 11 is more than branch.seed_per_domain=10" in capsys.readouterr().err


@pytest.mark.slow
def test_under_torchrun_rank_zero_generates_and_both_ranks_train_on_it(selfgen_run, llama_dir, tiny_data, tmp_path):
    """Two processes: the generated files equal one process's (generation ran once, on rank 0), and the
    recipe finishes with every rank training each expert on them."""
    import os
    import subprocess
    import sys

    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "upcycle.cli",
           "run", str(RECIPE), f"base={llama_dir}", f"data.train=[{tiny_data}]", f"out={out}", *TINY]
    proc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for domain in ("code", "math"):  # generation (which reports its progress) ran in one process
        assert (proc.stdout + proc.stderr).count(f"branch: {domain}: generating") == 1
    record = json.loads((out / "run.json").read_text())
    assert all(s["status"] == "done" for s in record["stages"].values())
    one, two = (json.loads((d / "branch" / "manifest.json").read_text())["generated"] for d in (selfgen_run, out))
    for domain in ("code", "math"):
        name = f"branch/data/{domain}.generated.jsonl"
        assert (out / name).read_bytes() == (selfgen_run / name).read_bytes()
        assert {k: v for k, v in one[domain].items() if k not in ("file", "seeds_file")} == \
               {k: v for k, v in two[domain].items() if k not in ("file", "seeds_file")}
