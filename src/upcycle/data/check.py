"""The data a config names, checked without training: what `upcycle validate` and `upcycle run`
(before any stage) find in the data files, so that a run does not fail on them hours in.

Each file must exist, be of a known type, and its first rows must parse as conversations under the
schema (`data.schema`, or the one detected); its rows are counted where that is cheap (every
format but a hub data set). Sizes that depend on the data are then checked against the count: a
seed set larger than the rows it is drawn from, a seed fraction that draws none.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import islice

from upcycle.errors import UpcycleError

PEEK_ROWS = 20
"""Rows parsed per file by the check (a bad row further down is still reported when training reads it)."""


@dataclass
class DataCheck:
    problems: list[str] = field(default_factory=list)
    rows: int | None = 0  # training rows over every file (None: not countable cheaply)


def check_data(spec, key: str = "data") -> DataCheck:
    """Open every file of `spec.train` and `spec.eval` (a config.DataSpec); count the training rows."""
    result = DataCheck()
    for part in ("train", "eval"):
        for entry in getattr(spec, part) or []:
            try:
                rows = _check_entry(entry, spec)
            except UpcycleError as e:
                result.problems += e.problems
                rows = None
            if part == "train":
                result.rows = None if rows is None or result.rows is None else result.rows + rows
    if result.rows is not None and spec.limit is not None:
        result.rows = min(result.rows, spec.limit)
    return result


def _check_entry(entry: str, spec) -> int | None:
    from upcycle.data.instructions import count_rows, detect_schema, iter_rows, map_columns, to_conversation, unknown_schema

    if entry == "suite":
        from upcycle.suite.mixes import make_suite

        return len(make_suite(spec.suite).rows("train"))
    schema = None if spec.schema_ == "auto" else spec.schema_
    for source, row in islice(iter_rows(entry), PEEK_ROWS):
        row = map_columns(row, spec.columns)
        schema = schema or detect_schema(row)
        if schema is None:
            raise unknown_schema(source, row)
        if spec.on_bad_row == "error":
            try:
                to_conversation(row, schema, source)
            except ValueError as e:
                raise UpcycleError(f"data {source}: {e} (set data.on_bad_row=skip to skip such rows)") from None
    rows = count_rows(entry)
    if rows == 0:
        raise UpcycleError(f"data {entry}: holds no rows")
    return rows


def seed_problems(section, rows: int | None, num_experts: int, at: str) -> list[str]:
    """A seed set (route's, or mix's ppl section; `at` names it: route., mix.ppl.) drawn from `rows` rows."""
    from upcycle.routing.buckets import seed_count

    if rows is None:
        return []
    try:
        seed_count(rows, section.seed_count, section.seed_fraction, num_experts, section.min_seed_per_expert)
    except UpcycleError as e:
        return [f"{at}{p}" for p in e.problems]
    return []


def config_data_problems(cfg) -> list[str]:
    """Every data file a config names (a recipe's `data`, or one stage's), and the seed sets that
    route and mix (router_init ppl) draw from them. Self-MoE's generated data does not exist yet
    and is not checked; the rows it is generated from are."""
    recipe = hasattr(cfg, "stages")
    mix = cfg.mix if recipe else cfg if hasattr(cfg, "router_init") else None
    if mix is not None and not recipe and mix.router_init != "ppl":
        return []  # mix reads data only for router_init=ppl
    if not hasattr(cfg, "data"):
        return []
    checked = check_data(cfg.data)
    problems = checked.problems
    route = cfg.route if recipe and "route" in cfg.stages else cfg if hasattr(cfg, "seed_fraction") else None
    if route is not None:
        experts = cfg.expand.num_experts if recipe else route.moe.num_experts
        problems += seed_problems(route, checked.rows, experts, "route." if recipe else "")
    if mix is not None and mix.router_init == "ppl" and (not recipe or "mix" in cfg.stages):
        experts = len(mix.experts) or mix.moe.num_experts
        problems += seed_problems(mix.ppl, checked.rows, experts, "mix.ppl." if recipe else "ppl.")
    return problems
