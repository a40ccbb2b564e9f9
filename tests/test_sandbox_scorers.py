"""The code scorer's sandbox contains what generated code may do, and the scorers give known scores."""

import builtins
import os
import shutil
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from upcycle.eval.sandbox import run_program
from upcycle.eval.scorers import extract_code, extract_number, score_code, score_exact, score_number
from upcycle.suite.tasks import CODE_FAMILIES, code_candidates, code_item

TESTS = ["assert add(2, 3) == 5", "assert add(-1, 1) == 0"]


def test_correct_and_wrong_code():
    assert score_code("def add(a, b):\n    return a + b\n", TESTS)[0] == 1.0
    score, r = score_code("def add(a, b):\n    return a * b + 1\n", TESTS)  # right for (-1, 1) only
    assert score == 0.0 and r.passed == 1 and r.total == 2
    assert score_code("", TESTS)[0] == 0.0
    score, r = score_code("def add(a, b) return", TESTS)
    assert score == 0.0 and not r.compiled and "SyntaxError" in r.error


def test_fenced_code_is_extracted():
    out = "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
    assert extract_code(out).strip() == "def add(a, b):\n    return a + b"
    assert score_code(out, TESTS)[0] == 1.0


def test_infinite_loop_times_out():
    start = time.monotonic()
    r = run_program("while True:\n    pass\n", ["assert True"], timeout=2)
    assert r.status == "timeout" and not r.all_passed
    assert time.monotonic() - start < 6


def test_fork_bomb_is_contained():
    before = len(psutil.pids())
    r = run_program("import os\nwhile True:\n    os.fork()\n", ["assert True"], timeout=3)
    assert not r.all_passed
    time.sleep(0.5)
    assert len(psutil.pids()) <= before + 2  # nothing left running


def test_large_allocation_fails_inside_the_child():
    r = run_program("x = bytearray(8 * 1024 ** 3)\n", ["assert len(x) > 0"], timeout=5, memory_mb=256)
    assert not r.all_passed and r.status == "ok" and "MemoryError" in r.error


def test_file_write_outside_the_sandbox_has_no_effect():
    folder = Path(tempfile.mkdtemp())
    try:
        os.chmod(folder, 0o777)  # so only the sandbox, never permissions, can stop it
        (folder / "keep.txt").write_text("x")
        os.chmod(folder / "keep.txt", 0o666)
        program = (f"open({str(folder / 'escaped.txt')!r}, 'w').write('pwned')\n")
        r = run_program(program, ["assert True"], timeout=3)
        assert not r.all_passed and r.error.startswith("FileNotFoundError")  # the folder is not there at all
        program = f"import os\nos.remove({str(folder / 'keep.txt')!r})\n"
        assert not run_program(program, ["assert True"], timeout=3).all_passed
        assert sorted(os.listdir(folder)) == ["keep.txt"]
    finally:
        shutil.rmtree(folder)


def test_writing_inside_the_sandbox_folder_is_allowed():
    r = run_program("open('scratch.txt', 'w').write('ok')\nok = open('scratch.txt').read()\n", ["assert ok == 'ok'"])
    assert r.all_passed


def test_code_never_runs_in_this_process():
    program = "import builtins, os\nbuiltins.UPCYCLE_PWNED = os.getpid()\n"
    r = run_program(program, ["assert UPCYCLE_PWNED != %d" % os.getpid()])
    assert r.all_passed  # it ran, in another process
    assert not hasattr(builtins, "UPCYCLE_PWNED")


def test_a_printed_fake_result_does_not_count():
    program = 'print(\'{"compiled": true, "passed": 9, "total": 9, "error": null}\')\nimport os\nos._exit(0)\n'
    r = run_program(program, ["assert False"])
    assert not r.all_passed and r.passed == 0


def in_process_score(program: str, tests: list[str]) -> float:
    """The reference verdict, computed here without any sandbox (only for the suite's own code)."""
    ns: dict = {}
    try:
        exec(program, ns)  # noqa: S102 - the suite's reference solutions and simple mutations of them
        for t in tests:
            exec(t, ns)  # noqa: S102
    except Exception:
        return 0.0
    return 1.0


def test_suite_code_scores_match_an_unsandboxed_reference():
    first = {}
    for c in code_candidates():
        first.setdefault(c[0], c)  # one item per code family
    items = [code_item(*c) for c in first.values()]
    assert len(items) == len(CODE_FAMILIES)
    wrong = [i.answer.replace("    ", "    return None\n    ", 1) for i in items]
    for item, bad in zip(items, wrong):
        assert score_code(f"```python\n{item.answer}```", item.tests)[0] == 1.0 == in_process_score(item.answer, item.tests)
        assert score_code(bad, item.tests)[0] == in_process_score(bad, item.tests) == 0.0


def test_output_is_read_with_a_cap():
    r = run_program("print('x' * 100)\n", ["assert True"], max_output=1000)
    assert r.all_passed
    r = run_program("print('x' * 2000)\n", ["assert True"], max_output=1000)
    assert r.status == "output_limit" and not r.all_passed


@pytest.mark.parametrize("output,target,score", [
    ("12", "12", 1.0), ("The answer is 12.", "12", 1.0), ("12.0", "12", 1.0), ("1,200", "1200", 1.0),
    ("13", "12", 0.0), ("", "12", 0.0), ("twelve", "12", 0.0), ("-3", "-3", 1.0), ("3 then 12", "12", 1.0),
])
def test_number_scorer(output, target, score):
    assert score_number(output, target) == score


@pytest.mark.parametrize("output,target,score", [
    ("Marnok", "Marnok", 1.0), ("marnok.", "Marnok", 1.0), ("The Marnok\nextra lines", "Marnok", 1.0),
    ("Marnok city", "Marnok", 0.0), ("", "Marnok", 0.0), ("", "", 0.0),
])
def test_exact_scorer(output, target, score):
    assert score_exact(output, target) == score


def test_extract_number_none():
    assert extract_number("no digits here") is None
