"""The `smol` task mix (suite/smol.py): disjoint splits, determinism, reference answers that score
1 under the suite's own scorers, and `data.suite.mix` selecting it for training rows and test items."""

from __future__ import annotations

import re
from collections import Counter
from typing import get_args

import pytest

from upcycle.config import DataSpec, SuiteMix, SuiteSpec
from upcycle.data.build import load_spec_conversations
from upcycle.eval.checkpoints import suite_test_items
from upcycle.eval.scorers import score_code, score_exact, score_number
from upcycle.eval.suite_eval import new_token_budget
from upcycle.suite import smol
from upcycle.suite.mixes import MIXES, make_suite
from upcycle.suite.tasks import DOMAINS, Item


@pytest.fixture(scope="module")
def suite():
    return smol.SmolSuite(seed=3, train_per_domain=40, test_per_domain=100)


def test_every_mix_in_the_schema_is_built():
    assert set(get_args(SuiteMix)) == set(MIXES)


def test_sizes_per_domain(suite):
    assert Counter(i.domain for i in suite.train) == {d: 40 for d in DOMAINS}
    assert Counter(i.domain for i in suite.test) == {d: 100 for d in DOMAINS}
    steps = Counter(i.prompt.count(", then ") + 1 for i in suite.test if i.domain == "code")
    assert steps == {2: 50, 3: 50}
    odd = Counter("does not belong" in i.prompt for i in suite.test if i.domain == "mc")
    assert odd == {True: 50, False: 50}


def test_train_and_test_never_share_a_question_a_chain_or_a_fact(suite):
    assert not {i.prompt for i in suite.train} & {i.prompt for i in suite.test}
    # code: the described chain of operations (the prompt without the function's name)
    chain = lambda i: re.sub(r"^Write a Python function \w+\((\w+)\) that takes \1, ", "", i.prompt).replace(
        re.match(r".*\((\w+)\)", i.prompt).group(1), "P")
    assert not {chain(i) for i in suite.train if i.domain == "code"} & {chain(i) for i in suite.test if i.domain == "code"}
    # math: the steps (the template's numbers) never recur across the split
    nums = lambda i: i.answer
    assert not {nums(i) for i in suite.train if i.domain == "math"} & {nums(i) for i in suite.test if i.domain == "math"}
    # knowledge and mc: a test fact (relation, subject) is asked in no training row, in either form
    assert not suite.test_facts & suite.train_facts
    assert not set(suite.odd_sets["test"]) & set(suite.odd_sets["train"])
    for rel, key in suite.test_facts:
        quoted = f"'{key}'" if rel in ("past", "opposite") else f" {key}?"
        assert not [i for i in suite.train if quoted in i.prompt and i.domain in ("knowledge", "mc")
                    and smol.RELATIONS[rel][0][key] in (i.answer, *i.options)], (rel, key)


def test_deterministic_and_test_set_independent_of_training_size():
    a, b = smol.SmolSuite(1, 40, 100), smol.SmolSuite(1, 40, 100)
    assert [i.to_json() for i in a.train + a.test] == [i.to_json() for i in b.train + b.test]
    bigger = smol.SmolSuite(1, 80, 100)
    assert [i.to_json() for i in bigger.test] == [i.to_json() for i in a.test]
    other = smol.SmolSuite(2, 40, 100)
    assert [i.prompt for i in other.test] != [i.prompt for i in a.test]


def test_too_many_items_is_refused_naming_the_domain():
    with pytest.raises(ValueError, match="knowledge/mc"):
        smol.SmolSuite(0, train_per_domain=200, test_per_domain=100)


def test_reference_answers_score_one_and_wrong_ones_zero(suite):
    code = [i for i in suite.test if i.domain == "code"][:5]
    for item in code:
        assert score_code(item.answer, item.tests)[0] == 1.0
        wrong = item.answer.replace("return ", "return 1 + ")
        assert score_code(wrong, item.tests)[0] == 0.0
    for item in suite.test:
        if item.domain == "math":
            steps = [step.split(" = ") for step in item.answer.split(", ")]
            assert len(steps) == 2 and all(eval(left) == int(right) for left, right in steps)  # noqa: S307
            assert steps[0][1] in steps[1][0].split()[::2]  # the second step uses the first's result
            assert score_number(item.answer, item.target) == 1.0 and int(item.target) == int(steps[1][1])
        elif item.domain == "knowledge":
            assert score_exact(item.answer, item.target) == 1.0
        elif item.domain == "mc":
            assert len(set(item.options)) == 4 and item.options[item.correct] == item.answer
            assert f"{'ABCD'[item.correct]}. {item.answer}\n" in item.prompt + "\n"


def test_math_steps_follow_the_template():
    item = smol.math_item(3, 5, 4, 3, smol.random.Random(0))  # a + b * c: has 5, buys 4 packs of 3
    assert item.answer == "4 * 3 = 12, 5 + 12 = 17" and item.target == "17"
    assert "5 " in item.prompt and "4 packs of 3" in item.prompt
    assert (2, 9, 9, 9) not in smol.math_candidates()  # (9 + 9) * 9 is no one-digit product


def test_code_chain_applies_operations_left_to_right():
    item = smol.code_item(((0, 4), (2, 3)), "f", "x")  # adds 4, then multiplies by 3
    assert item.answer == "def f(x):\n    return (x + 4) * 3\n"
    assert "assert f(3) == 21" in item.tests
    item = smol.code_item(((4, None), (5, 3), (0, 2)), "g", "n")  # negates, then remainder mod 3, then adds 2
    assert item.answer == "def g(n):\n    return ((-n) % 3) + 2\n"
    assert "assert g(7) == 4" in item.tests  # (-7) % 3 == 2 in Python
    assert len(smol.code_candidates(2)) == 780 and all(a[0] != b[0] for a, b in smol.code_candidates(2))


def test_data_suite_mix_selects_training_rows_and_test_items():
    spec = SuiteSpec(mix="smol", seed=3, train_per_domain=40, test_per_domain=100)
    convs, report = load_spec_conversations(["suite"], DataSpec(suite=spec))
    expected = smol.SmolSuite(3, 40, 100)
    assert report.rows == len(expected.train) == 160
    assert [c.messages[-1]["content"] for c in convs] == [i.answer for i in expected.train]
    items = suite_test_items(spec, 10)
    assert Counter(i.domain for i in items) == {d: 10 for d in DOMAINS}
    assert [new_token_budget(i) for i in items if i.domain != "mc"][::10] == [40, 24, 8]
    builtin = make_suite(SuiteSpec(seed=3, train_per_domain=5, test_per_domain=5))
    assert type(builtin).__name__ == "Suite"
    assert [new_token_budget(Item(d, "q", "a")) for d in ("code", "math", "knowledge")] == [48, 6, 12]


def _reproduce():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "reproduce.py"
    spec = importlib.util.spec_from_file_location("reproduce", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("reproduce", module)  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_ablations_take_over_upit_stages_only_when_the_pipeline_would_accept_them(tmp_path):
    """bench/reproduce.py hard-links upit_lora's finished leading stages into an ablation's run while
    their configs hash equal; the pipeline's own plan must then skip exactly those, and a stage whose
    config differs (and every one after it) must run anew."""
    import contextlib
    import json

    from upcycle.config_io import config_hash
    from upcycle.pipeline import RUN_MANIFEST, _plan, _stage_digest, stage_configs

    rep = _reproduce()
    prof = rep.PROFILES["smollm2"]
    size = [*prof.overrides, "data.suite.train_per_domain=40", "evaluate=false"]
    source = tmp_path / "upit_lora"
    upit = rep.recipe_config("upit_lora", 0, source, size)
    stages = {}
    for stage in ("prepare", "expand", "route"):
        (source / stage).mkdir(parents=True)
        (source / stage / "manifest.json").write_text(json.dumps({"stage": stage, "complete": True}))
        stages[stage] = {"status": "done", "config_hash": config_hash(stage_configs(upit)[stage], anchor=source),
                         "manifest_sha256": _stage_digest(source / stage)}
    (source / RUN_MANIFEST).write_text(json.dumps({"recipe": "upit_lora", "stages": stages}))

    def plan(cfg):
        with contextlib.ExitStack() as lock:
            return _plan(cfg, stage_configs(cfg), [], lock)[1]

    other = rep.recipe_config("ablation_random_buckets", 0, tmp_path / "other", size + ["prepare.train.lr=5e-4"])
    assert rep.share_stages(source, other) == [] and not (tmp_path / "other").exists()

    expected = {"ablation_random_buckets": ["prepare", "expand"],     # its own buckets: route differs
                "ablation_no_router_init": ["prepare", "expand"],    # no route stage at all
                "ablation_random_parents": ["prepare"],              # its own expansion
                "upit_relative_buckets": ["prepare", "expand"]}
    for recipe, shared in expected.items():
        cfg = rep.recipe_config(recipe, 0, tmp_path / recipe, size)
        assert rep.share_stages(source, cfg) == shared, recipe
        assert (tmp_path / recipe / "prepare" / "manifest.json").stat().st_ino == \
            (source / "prepare" / "manifest.json").stat().st_ino  # hard-linked, not copied
        assert plan(cfg) == [s for s in stage_configs(cfg) if s not in shared], recipe
        assert rep.share_stages(source, cfg) == []  # a run folder that exists is never touched again

    # a finished upit_lora with a hand-edited expand manifest: prepare is shared, expand is not
    (source / "expand" / "manifest.json").write_text(json.dumps({"stage": "expand", "complete": False}))
    cfg = rep.recipe_config("ablation_random_buckets", 0, tmp_path / "edited", size)
    assert rep.share_stages(source, cfg) == ["prepare"]


def test_prune_frees_scored_weights_and_keeps_what_ablations_and_reports_read(tmp_path):
    rep = _reproduce()
    run = tmp_path / "run"
    files = {"prepare/checkpoints/checkpoint-1/adapter_model.safetensors": 100, "expand/experts/e0.safetensors": 10,
             "route/routers.safetensors": 3, "mix/moe/model.safetensors": 50,
             "post_train/checkpoints/checkpoint-4/model.safetensors": 70,
             "post_train/model/model-00001-of-00002.safetensors": 40, "post_train/model/model.safetensors.index.json": 2,
             "post_train/model/config.json": 1, "post_train/manifest.json": 1, "results.json": 1}
    for name, size in files.items():
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_bytes(b"x" * size)
    assert rep.prune_weights(run, keep_model=True) == 50 + 70
    assert rep.prune_weights(run, keep_model=False) == 40 + 2
    left = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())
    assert left == sorted(["prepare/checkpoints/checkpoint-1/adapter_model.safetensors", "expand/experts/e0.safetensors",
                           "route/routers.safetensors", "post_train/model/config.json", "post_train/manifest.json",
                           "results.json"])
