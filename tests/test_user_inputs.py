"""A user's own model, data and evaluation, named the way the ecosystem names them (issue 26):
models by bundled name or hub id (served from a Hugging Face cache with the network off), data as
ShareGPT / OpenAI / Alpaca in JSONL, JSON, parquet, CSV, a saved `datasets` folder or `hf:` from a
`datasets` cache, column mapping, evaluation that follows the data, the path every command prints."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.conftest import logits_of
from upcycle.cli import main

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
ALPACA = [{"instruction": f"add {i} and {i + 1}", "output": f"{2 * i + 1}", "domain": ("math", "code")[i % 2]}
          for i in range(24)]


def cli(env: dict, *args, timeout: int = 300) -> subprocess.CompletedProcess:
    """The CLI in its own process, with its own environment (huggingface_hub and datasets read theirs at import)."""
    return subprocess.run([sys.executable, "-m", "upcycle.cli", *map(str, args)], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=timeout)


def printed_model(stdout: str) -> tuple[Path, str]:
    """(path, how to load) from the `model: PATH  -> load with ...` line every command prints."""
    m = re.search(r"^model: (\S+)  -> load with (.*)$", stdout, re.M)
    assert m, stdout
    return Path(m.group(1)), m.group(2)


def hub_cache(root: Path, repo: str, folder: Path, kind: str = "models") -> Path:
    """A Hugging Face hub cache (as `hf download` leaves it) holding `folder` as repo@COMMIT, ref main."""
    entry = root / "hub" / f"{kind}--{repo.replace('/', '--')}"
    shutil.copytree(folder, entry / "snapshots" / COMMIT)
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(COMMIT)
    return root


# ------------------------------------------------------------------------------ models by name


def test_build_takes_a_bundled_name_and_prints_where_the_model_is(tmp_path, capsys):
    out = tmp_path / "moe"
    assert main(["build", "--base", "bundled:suite-base", "--out", str(out), "--num-experts", "2", "--top-k", "1",
                 "--quiet"]) == 0
    path, how = printed_model(capsys.readouterr().out)
    assert path == out and "AutoModelForCausalLM.from_pretrained" in how
    assert AutoModelForCausalLM.from_pretrained(path).config.model_type == "mixtral"


def test_build_json_keeps_stdout_one_json_document(tmp_path, capsys):
    """`--json` is for scripts (the demo parses it): the model line goes to stderr, stdout stays JSON."""
    out = tmp_path / "moe"
    assert main(["build", "--base", "bundled:suite-base", "--out", str(out), "--num-experts", "2", "--top-k", "1",
                 "--quiet", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["experts"] == 2
    assert printed_model(captured.err)[0] == out


def test_a_hub_id_is_served_from_the_cache_with_the_network_off(llama_dir, tmp_path):
    env = {"HF_HOME": str(hub_cache(tmp_path / "hf", "acme/tiny-llama", llama_dir)), "HF_HUB_OFFLINE": "1"}
    for name in ("acme/tiny-llama", f"acme/tiny-llama@{COMMIT}"):
        out = tmp_path / name.replace("/", "_").replace("@", "_")
        proc = cli(env, "build", "--base", name, "--out", out, "--num-experts", "2", "--top-k", "1", "--quiet")
        assert proc.returncode == 0, proc.stderr
        assert printed_model(proc.stdout)[0] == out
        card = (out / "README.md").read_text()
        assert "base_model: acme/tiny-llama" in card and COMMIT[:12] in card and str(tmp_path) not in card
        provenance = json.loads((out / "upcycle_provenance.json").read_text())
        assert provenance["base_source"] == {"name": name, "source": "hub", "repo": "acme/tiny-llama", "revision": COMMIT}
    proc = cli(env, "build", "--base", "acme/missing", "--out", tmp_path / "x", "--quiet")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "hf download acme/missing" in lines[0], proc.stderr
    assert not (tmp_path / "x").exists()


def test_a_stage_records_the_hub_model_it_trained_from(llama_dir, tmp_path):
    env = {"HF_HOME": str(hub_cache(tmp_path / "hf", "acme/tiny-llama", llama_dir)), "HF_HUB_OFFLINE": "1"}
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in ALPACA))
    proc = cli(env, "prepare", "--base", "acme/tiny-llama", "--data", data, "--out", tmp_path / "p", "--quiet",
               "train.epochs=1", "save_every=1", "train.batch_size=8")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert manifest["base_source"]["repo"] == "acme/tiny-llama" and manifest["base_source"]["revision"] == COMMIT
    path, how = printed_model(proc.stdout)
    assert "PeftModel.from_pretrained" in how and (path / "adapter_config.json").is_file()


# ------------------------------------------------------------------------------ data as people have it


def as_sharegpt(row):
    return {"conversations": [{"from": "human", "value": row["instruction"]}, {"from": "gpt", "value": row["output"]}],
            "domain": row["domain"]}


def test_sharegpt_parquet_csv_and_mapped_columns_read_as_the_same_conversations(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from upcycle.data.instructions import load_conversations

    want, _ = load_conversations([_write_jsonl(tmp_path / "alpaca.jsonl", ALPACA)])
    sharegpt = _write_jsonl(tmp_path / "chat.jsonl", [as_sharegpt(r) for r in ALPACA])
    (tmp_path / "chat.json").write_text(json.dumps([as_sharegpt(r) for r in ALPACA]))
    pq.write_table(pa.Table.from_pylist(ALPACA), tmp_path / "rows.parquet")
    with open(tmp_path / "rows.csv", "w") as f:
        f.write("instruction,output,domain\n" + "".join(f"{r['instruction']},{r['output']},{r['domain']}\n" for r in ALPACA))
    renamed = _write_jsonl(tmp_path / "qa.jsonl", [{"question": r["instruction"], "answer": r["output"],
                                                     "domain": r["domain"]} for r in ALPACA])
    for path, columns in ((sharegpt, None), (tmp_path / "chat.json", None), (tmp_path / "rows.parquet", None),
                          (tmp_path / "rows.csv", None), (renamed, {"instruction": "question", "output": "answer"})):
        got, report = load_conversations([path], columns=columns)
        assert [c.messages for c in got] == [c.messages for c in want], path
        assert [c.domain for c in got] == [c.domain for c in want] and report.rows == len(ALPACA)
    with pytest.raises(Exception, match="unknown schema .*data.columns"):
        load_conversations([renamed])
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"conversations": [{"from": "robot", "value": "x"}]}])
    with pytest.raises(Exception, match="turn 0 must be .*from='robot'"):
        load_conversations([bad])


def test_hf_data_comes_from_the_datasets_cache_offline(tmp_path):
    """hf:ORG/NAME:SPLIT through `datasets`' cache: a copy made the way load_dataset leaves one, read
    with the network off; a data set that is not cached is one line."""
    data = _write_jsonl(tmp_path / "rows.jsonl", [as_sharegpt(r) for r in ALPACA])
    home = tmp_path / "hf"
    build = f"""
import datasets, glob, os, shutil
b = datasets.load_dataset_builder("json", data_files={{"train": {str(data)!r}}}, cache_dir={str(tmp_path / "build")!r})
b.download_and_prepare()
src = glob.glob({str(tmp_path / "build")!r} + "/json/*/*/*")[0]
dst = os.path.join({str(home / "datasets")!r}, "acme___chats", "default", "0.0.0", os.path.basename(src))
shutil.copytree(src, dst)
os.rename(os.path.join(dst, "json-train.arrow"), os.path.join(dst, "chats-train.arrow"))
"""
    env = {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", build], env={**os.environ, "HF_HOME": str(home)}, check=True, capture_output=True)
    read = ("import json, sys; from upcycle.data.instructions import load_conversations; "
            "convs, _ = load_conversations([sys.argv[1]]); print(json.dumps([c.messages for c in convs]))")
    proc = subprocess.run([sys.executable, "-c", read, "hf:acme/chats:train"], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])[0] == [{"role": "user", "content": "add 0 and 1"},
                                                                   {"role": "assistant", "content": "1"}]
    proc = cli(env, "validate", RECIPES / "dense_lora.yaml", "data.train=[hf:acme/not-cached]")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "hf:acme/not-cached" in lines[0], proc.stderr


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


# ------------------------------------------------------------------------------ a run on your own data


RUN = ["--quiet", "data.max_length=64", "prepare.train.epochs=1", "prepare.save_every=0.5", "prepare.train.batch_size=8",
       "data.eval_fraction=0.1"]


def test_own_data_is_not_scored_on_the_suite_and_turning_evaluation_on_never_retrains(llama_dir, tmp_path, capsys):
    data = _write_jsonl(tmp_path / "mine.jsonl", [as_sharegpt(r) for r in ALPACA])  # a ShareGPT file of the user's
    out = tmp_path / "run"
    argv = ["run", str(RECIPES / "dense_lora.yaml"), f"base={llama_dir}", f"data.train=[{data}]", f"out={out}", *RUN]
    assert main(argv) == 0, capsys.readouterr().err
    manifest = json.loads((out / "prepare" / "manifest.json").read_text())
    assert all(c.get("scores") is None for c in manifest["checkpoints"])  # evaluate: auto, own data: no suite
    assert not (out / "prepare" / "checkpoint_scores.json").exists()
    results = json.loads((out / "results.json").read_text())
    assert results["model"].endswith(manifest["checkpoints"][-1]["path"]) and results["scores"] is None
    assert manifest["train_report"]["chat_template"].startswith("the tokenizer's own (sha256")
    weights = {p: p.stat().st_mtime_ns for p in (out / "prepare" / "checkpoints").rglob("*.safetensors")}
    assert main([*argv, "evaluate=true", "eval_max_items=2"]) == 0, capsys.readouterr().err  # eval_checkpoints: auto
    manifest = json.loads((out / "prepare" / "manifest.json").read_text())
    assert manifest["checkpoints"][-1]["scores"] and manifest["checkpoints"][0].get("scores") is None
    assert {p: p.stat().st_mtime_ns for p in (out / "prepare" / "checkpoints").rglob("*.safetensors")} == weights
    record = json.loads((out / "run.json").read_text())["stages"]["prepare"]
    assert record["evaluation"] == {"evaluate": True, "eval_max_items": 2, "eval_checkpoints": "last"}


@pytest.mark.parametrize("recipe, setting, expected", [("upit_lora", "auto", "none"), ("upit_lora", "all", "all"),
                                                       ("upit_lora", "last", "last"), ("dense_lora", "auto", "last"),
                                                       ("dense_sft", "auto", "last"), ("upit_ffn", "auto", "none")])
def test_eval_checkpoints_auto_scores_stage_1_only_where_it_is_the_deliverable(recipe, setting, expected):
    from upcycle.config_io import load_config
    from upcycle.pipeline import RunConfig, stage_configs

    cfg = load_config(RunConfig, RECIPES / f"{recipe}.yaml", ["out=/tmp/unused", f"eval_checkpoints={setting}"])
    assert stage_configs(cfg)["prepare"].eval_checkpoints == expected


@pytest.mark.parametrize("section, refused", [("auto", False), ("none", False), ("all", True)])
def test_a_stage_repeating_the_recipes_eval_checkpoints_is_accepted_and_a_different_one_refused(section, refused):
    """prepare.eval_checkpoints is compared with the recipe's after both resolve `auto` (UpIT: none)."""
    from upcycle.config_io import load_config
    from upcycle.errors import UpcycleError
    from upcycle.pipeline import RunConfig, stage_configs

    overrides = ["out=/tmp/unused", f"prepare.eval_checkpoints={section}"]
    if refused:
        with pytest.raises(UpcycleError, match=r"prepare\.eval_checkpoints: 'all' contradicts the recipe's "
                                               r"eval_checkpoints='none'"):
            load_config(RunConfig, RECIPES / "upit_lora.yaml", overrides)
    else:
        assert stage_configs(load_config(RunConfig, RECIPES / "upit_lora.yaml", overrides))["prepare"].eval_checkpoints == "none"


def test_a_plain_upit_run_scores_its_moe_and_no_stage_1_checkpoint(llama_dir, tmp_path, capsys):
    """Figure 2 (every stage-1 checkpoint scored) is opt-in: by default UpIT scores only what it delivers."""
    data = _write_jsonl(tmp_path / "d.jsonl", ALPACA)
    out = tmp_path / "upit"
    argv = ["run", str(RECIPES / "upit_lora.yaml"), f"base={llama_dir}", f"data.train=[{data}]", f"out={out}", *RUN,
            "prepare.train.epochs=2", "prepare.save_every=0.25", "prepare.train.batch_size=2", "route.seed_count=8",
            "route.train.epochs=1", "route.train.batch_size=4", "post_train.train.batch_size=4", "post_train.train.epochs=0.5",
            "post_train.save_every=0.5", "evaluate=true", "eval_max_items=1"]
    assert main(argv) == 0, capsys.readouterr().err
    prepare = json.loads((out / "prepare" / "manifest.json").read_text())
    assert len(prepare["checkpoints"]) == 8 and all(c.get("scores") is None for c in prepare["checkpoints"])
    assert json.loads((out / "post_train" / "manifest.json").read_text())["scores"]
    assert main([*argv, "eval_checkpoints=all"]) == 0, capsys.readouterr().err  # Figure 2 asked for: scores only
    prepare = json.loads((out / "prepare" / "manifest.json").read_text())
    assert all(c["scores"] for c in prepare["checkpoints"]) and (out / "prepare" / "checkpoint_scores.png").is_file()


def test_a_training_stage_draws_its_loss_curve_and_logs_to_tensorboard(llama_dir, tmp_path):
    data = _write_jsonl(tmp_path / "d.jsonl", ALPACA)
    assert main(["prepare", "--base", str(llama_dir), "--data", str(data), "--out", str(tmp_path / "p"), "--quiet",
                 "train.epochs=2", "save_every=1", "train.batch_size=4", "train.logging_steps=2",
                 "train.report_to=[tensorboard]"]) == 0
    history = json.loads((tmp_path / "p" / "loss_history.json").read_text())
    steps = [h["step"] for h in history if "loss" in h]
    assert len(steps) >= 3 and steps == sorted(steps) and any("eval_loss" in h for h in history)
    png = (tmp_path / "p" / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    events = list((tmp_path / "p").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


# ------------------------------------------------------------------------------ lm-eval by task name


TASK = """task: toy_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
ITEMS = [{"question": "Q: 2+2=", "choices": ["4", "5", "x"], "label": 0},
         {"question": "Q: sky is", "choices": ["blue", "red"], "label": 1},
         {"question": "Q: abc", "choices": ["d", "e", "f", "g"], "label": 2},
         {"question": "Q: one", "choices": ["two", "three"], "label": 0},
         {"question": "Q: up", "choices": ["down", "left"], "label": 1}]


def hand_logliks(model, tokenizer, item) -> list[float]:
    """Sum of log-probabilities of ' ' + choice after the question: lm-eval's multiple-choice score."""
    out = []
    for choice in item["choices"]:
        context = tokenizer(item["question"], add_special_tokens=False)["input_ids"]
        whole = tokenizer(item["question"] + " " + choice, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
        out.append(sum(logp[t - 1, whole[t]].item() for t in range(len(context), len(whole))))
    return out


def test_lm_eval_task_by_name_matches_a_hand_computation(llama_dir, tmp_path, capsys):
    from transformers import AutoTokenizer

    from upcycle.eval.benchmarks import run_lm_eval

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "toy.jsonl").write_text("\n".join(json.dumps(i) for i in ITEMS))
    (tasks / "toy_mc.yaml").write_text(TASK.format(data=tasks / "toy.jsonl"))
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    result = run_lm_eval(model, tokenizer, ["toy_mc"], include_path=tasks, log_samples=True, batch_size=2)
    hand = [hand_logliks(model, tokenizer, item) for item in ITEMS]
    samples = sorted(result["samples"]["toy_mc"], key=lambda s: s["doc_id"])
    for sample, want in zip(samples, hand):
        got = [r[0][0] if isinstance(r[0], (list, tuple)) else r[0] for r in sample["resps"]]
        assert got == pytest.approx(want, abs=1e-3)
    acc = sum(max(range(len(h)), key=h.__getitem__) == i["label"] for h, i in zip(hand, ITEMS)) / len(ITEMS)
    assert result["results"]["toy_mc"]["acc,none"] == pytest.approx(acc)
    # the CLI, on an upcycled (Mixtral) model: by task name, with its own request cache beside the results
    moe = tmp_path / "moe"
    assert main(["build", "--base", str(llama_dir), "--out", str(moe), "--num-experts", "2", "--top-k", "1", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["eval", str(moe), "tasks=toy_mc", f"include_path={tasks}", f"out={tmp_path / 'r.json'}"]) == 0
    results = json.loads((tmp_path / "r.json").read_text())
    assert "suite" not in results  # tasks asked for: the built-in suite is not scored by default
    copy = logits_of(AutoModelForCausalLM.from_pretrained(moe), torch.tensor([[5, 6, 7]]))
    assert torch.allclose(copy, logits_of(model, torch.tensor([[5, 6, 7]])), atol=1e-4)  # a copy-upcycled MoE
    assert results["lm_eval"]["results"]["toy_mc"]["acc,none"] == pytest.approx(acc)
    assert list((tmp_path / "lm_eval_cache").glob("requests*"))
    assert main(["eval", str(moe), "tasks=no_such_task", f"include_path={tasks}"]) == 2
    assert "no_such_task" in capsys.readouterr().err


# ------------------------------------------------------------------------------ mix from the command line


def test_mix_prompts_from_a_file_or_flags_and_its_data_are_all_seed_rows(llama_dir, tmp_path, capsys):
    from safetensors.torch import load_file

    from tests.test_mix import fine_tune

    a, b = fine_tune(llama_dir, tmp_path / "a", 1), fine_tune(llama_dir, tmp_path / "b", 2)
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text(f"{b}: {{positive: [hello]}}\n{a}: {{positive: [abc def], negative: ['123']}}\n")  # by expert
    common = ["mix", "--base", str(llama_dir), "--expert", str(a), "--expert", str(b), "--quiet"]
    assert main([*common, "--out", str(tmp_path / "f"), "--router-init", "prompts", "--prompts", str(prompts)]) == 0
    assert main([*common, "--out", str(tmp_path / "g"), "--router-init", "cheap_embed", "--expert-prompt", "abc def",
                 "--expert-prompt", "hello"]) == 0
    assert main([*common, "--out", str(tmp_path / "h"), "--router-init", "cheap_embed", "--prompts", str(prompts)]) == 0
    by_flag, by_file = (load_file(tmp_path / d / "routers.safetensors") for d in ("g", "h"))
    assert not torch.equal(by_flag["model.layers.0.mlp.router.weight"], by_file["model.layers.0.mlp.router.weight"])
    code = main([*common, "--out", str(tmp_path / "x"), "--router-init", "prompts"])
    err = capsys.readouterr().err
    assert code == 2 and "needs one {positive: [...], negative: [...]} entry" in err and "}}" not in err
    seed = _write_jsonl(tmp_path / "seed.jsonl", ALPACA[:10])
    summary = main([*common, "--out", str(tmp_path / "p"), "--router-init", "ppl", "--data", str(seed),
                    "ppl.train.epochs=1", "ppl.train.batch_size=4"])
    assert summary == 0
    routing = json.loads((tmp_path / "p" / "manifest.json").read_text())["routing"]
    assert routing["seed_samples"] == 10  # every row given, not 5 % of them
    path, how = printed_model(capsys.readouterr().out)
    assert path == tmp_path / "p" / "model" and AutoModelForCausalLM.from_pretrained(path) is not None


# ------------------------------------------------------------------------------ outputs in one place


TINY_UPIT = ["data.max_length=64", "data.eval_fraction=0.1", "prepare.train.epochs=2", "prepare.train.batch_size=8",
             "prepare.save_every=0.5", "route.seed_count=8", "route.train.epochs=1", "route.train.batch_size=4",
             "post_train.train.batch_size=4", "post_train.train.epochs=0.5", "post_train.save_every=0.5",
             "expand.num_experts=3", "post_train.moe.num_experts=3"]


def test_every_command_prints_a_path_that_loads_and_cards_hold_no_local_paths(llama_dir, tmp_path, capsys):
    data = _write_jsonl(tmp_path / "mine.jsonl", [as_sharegpt(r) for r in ALPACA])
    run = tmp_path / "run"
    assert main(["run", str(RECIPES / "upit_lora.yaml"), "--quiet", f"base={llama_dir}", f"data.train=[{data}]",
                 f"out={run}", *TINY_UPIT]) == 0, capsys.readouterr().err
    path, how = printed_model(capsys.readouterr().out)
    assert path == run / "post_train" / "model" and json.loads((run / "results.json").read_text())["model"] == \
        "post_train/model"
    assert "from_pretrained" in how and AutoModelForCausalLM.from_pretrained(path) is not None
    card = (path / "README.md").read_text()
    assert str(tmp_path) not in card and "/tmp" not in card and "mine.jsonl (sha256 " in card
    # stage 1's LoRA: rank 16, alpha 32 (upit_lora.yaml); the MoE's experts keep both
    assert "rank 16, alpha 32.0" in card
    merge = tmp_path / "merge.yaml"
    merge.write_text(f"method: linear\nmodels: [{{path: {llama_dir}}}, {{path: {llama_dir}}}]\nout: {tmp_path / 'm'}\n")
    assert main(["merge", str(merge), "--quiet"]) == 0
    path, how = printed_model(capsys.readouterr().out)
    assert path == tmp_path / "m" and AutoModelForCausalLM.from_pretrained(path) is not None
