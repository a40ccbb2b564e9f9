"""Scorers for generated answers: code (sandboxed tests), numbers, short answers. Pure string logic,
except code, which runs in `sandbox.run_program`, never in this process."""

from __future__ import annotations

import re
import string

from upcycle.eval.sandbox import SandboxResult, run_program

FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)(?:```|$)", re.DOTALL)
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def extract_code(output: str) -> str:
    """The program in a model's answer: the first fenced block if there is one, else the whole text."""
    m = FENCE.search(output)
    return m.group(1) if m else output


def score_code(output: str, tests: list[str], timeout: float = 5.0,
               allow_unsafe: bool | None = None) -> tuple[float, SandboxResult]:
    """1.0 if every hidden test passes (pass@1), else 0.0; with the sandbox's report. `allow_unsafe`:
    see sandbox.require_isolation (None: the UPCYCLE_ALLOW_UNSAFE_CODE_EVAL variable decides)."""
    result = run_program(extract_code(output), tests, timeout=timeout, allow_unsafe=allow_unsafe)
    return float(result.all_passed), result


def extract_number(output: str) -> str | None:
    """The last number in the answer, normalized ('12.0' -> '12'); None if there is none."""
    found = NUMBER.findall(output.replace(",", ""))
    if not found:
        return None
    value = float(found[-1])
    return str(int(value)) if value.is_integer() else str(value)


def score_number(output: str, target: str) -> float:
    got = extract_number(output)
    return float(got is not None and got == extract_number(target))


def normalize_answer(text: str) -> str:
    """First line, lower case, without punctuation, articles or extra spaces."""
    first = text.strip().split("\n", 1)[0].lower()
    first = first.translate(str.maketrans("", "", string.punctuation))
    words = [w for w in first.split() if w not in ("a", "an", "the")]
    return " ".join(words)


def score_exact(output: str, target: str) -> float:
    return float(normalize_answer(output) == normalize_answer(target) and normalize_answer(target) != "")
