"""The built-in task suite: four domains mirroring the paper's benchmark kinds, offline and seeded.

    code       write a small Python function; scored by hidden tests run in a sandbox
    math       arithmetic word problems; numeric answer, exact match
    knowledge  questions about the invented world; short answer, exact match
    mc         multiple choice; scored by the log-likelihood of each option

Train and test items never share a question: each domain's candidate pool is enumerated, shuffled
with the experiment seed and cut into disjoint parts. `corpus()` is the raw text the suite's base
model was pre-trained on: the world's facts, arithmetic tables, example functions and category
statements, none of them phrased as an instruction.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

from upcycle.suite.world import CATEGORIES, WORLD_SEED, Country, make_world

DOMAINS = ("code", "math", "knowledge", "mc")


@dataclass
class Item:
    domain: str
    prompt: str
    answer: str                     # the reference response (training target)
    target: str = ""                # what the scorer compares (math, knowledge)
    entry_point: str = ""           # code: function name
    tests: list[str] = field(default_factory=list)  # code: assert statements
    options: list[str] = field(default_factory=list)  # mc
    correct: int = -1               # mc: index of the right option

    def row(self) -> dict:
        """An alpaca-schema training row; the domain travels as metadata."""
        return {"instruction": self.prompt, "output": self.answer, "domain": self.domain}

    def to_json(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------ code

CODE_FAMILIES = [
    # (description with {p} and {k}, body, parameter names, needs k, test inputs)
    ("returns {p} plus {k}", "return {p} + {k}", ["x", "n", "value"], True, [0, 3, -2, 10]),
    ("returns {p} minus {k}", "return {p} - {k}", ["x", "n", "value"], True, [0, 7, 15, -1]),
    ("returns {p} times {k}", "return {p} * {k}", ["x", "n", "value"], True, [0, 2, 5, -3]),
    ("returns the square of {p}", "return {p} * {p}", ["x", "n"], False, [0, 3, -4, 9]),
    ("returns True if {p} is even", "return {p} % 2 == 0", ["n", "x"], False, [0, 3, 8, 11]),
    ("returns the string {p} reversed", "return {p}[::-1]", ["s", "word", "text"], False, ["abc", "", "hello", "xy"]),
    ("returns the string {p} in upper case", "return {p}.upper()", ["s", "word", "text"], False, ["abc", "Hi", "", "x1"]),
    ("returns the sum of the list {p}", "return sum({p})", ["xs", "items", "values"], False, [[1, 2], [], [5, -5, 3], [7]]),
    ("returns the largest item of the list {p}", "return max({p})", ["xs", "items", "values"], False, [[1, 2], [3], [-5, -2], [4, 9, 1]]),
    ("returns the length of the list {p}", "return len({p})", ["xs", "items", "values"], False, [[1, 2], [], [0, 0, 0], [9]]),
]
FUNC_NAMES = ["compute", "transform", "helper", "process", "solve", "calc", "apply_op", "handle", "convert", "evaluate",
              "f", "g", "func", "do_it", "result_of", "work"]


def code_candidates() -> list[tuple]:
    out = []
    for fi, (desc, body, params, needs_k, _) in enumerate(CODE_FAMILIES):
        for name in FUNC_NAMES:
            for p in params:
                for k in (range(1, 10) if needs_k else [None]):
                    out.append((fi, name, p, k))
    return out


def code_item(fi: int, name: str, p: str, k: int | None) -> Item:
    desc, body, _, _, inputs = CODE_FAMILIES[fi]
    desc, body = desc.format(p=p, k=k), body.format(p=p, k=k)
    source = f"def {name}({p}):\n    {body}\n"
    namespace: dict = {}
    exec(source, namespace)  # noqa: S102 - the suite's own reference solution, not model output
    tests = [f"assert {name}({x!r}) == {namespace[name](x)!r}" for x in inputs]
    prompt = f"Write a Python function {name}({p}) that {desc}."
    return Item("code", prompt, source, entry_point=name, tests=tests)


# ------------------------------------------------------------------------------ math

MATH_TEMPLATES = [
    ("+", "{who} has {a} {thing}s and gets {b} more. How many {thing}s does {who} have now?"),
    ("+", "There are {a} {thing}s in a box and {b} in another. How many {thing}s are there in total?"),
    ("-", "{who} had {a} {thing}s and gave away {b}. How many {thing}s are left?"),
    ("-", "A shelf holds {a} {thing}s. {b} are taken. How many {thing}s remain on the shelf?"),
    ("*", "{who} buys {a} bags with {b} {thing}s in each. How many {thing}s does {who} have?"),
    ("*", "There are {a} rows of {thing}s with {b} in each row. How many {thing}s are there?"),
]
WHO = ["Ana", "Ben", "Cora", "Dev", "Eli", "Fay", "Gus", "Hana"]
THINGS = ["apple", "book", "coin", "marble", "pencil", "shell", "stamp", "card"]


def _apply(op: str, a: int, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def math_candidates() -> list[tuple]:
    out = []
    for ti, (op, _) in enumerate(MATH_TEMPLATES):
        for a in range(2, 10):
            for b in range(2, 10):
                if op == "-" and b >= a:
                    continue
                out.append((ti, a, b))
    return out


def math_item(ti: int, a: int, b: int, rng: random.Random) -> Item:
    op, template = MATH_TEMPLATES[ti]
    prompt = template.format(who=rng.choice(WHO), thing=rng.choice(THINGS), a=a, b=b)
    value = str(_apply(op, a, b))
    return Item("math", prompt, value, target=value)


# ------------------------------------------------------------------------------ knowledge

# Cloze questions in the phrasing of the pre-training corpus: they test whether instruction tuning
# lets the model bring out what it read (held-out facts), not whether it can re-phrase knowledge,
# which a model of a few million parameters does not learn from two phrasings per fact.
RELATIONS = {
    "capital": ("Complete the sentence: The capital of {c} is", lambda c: c.capital),
    "language": ("Complete the sentence: People in {c} speak", lambda c: c.language),
    "export": ("Complete the sentence: {c} exports", lambda c: c.export),
}


def knowledge_item(country: Country, relation: str) -> Item:
    question, get = RELATIONS[relation]
    answer = get(country)
    return Item("knowledge", question.format(c=country.name), answer, target=answer)


# ------------------------------------------------------------------------------ multiple choice

LETTERS = "ABCD"


def mc_item(rng: random.Random, world: list[Country]) -> Item:
    if rng.random() < 0.5:
        category = rng.choice(sorted(CATEGORIES))
        right = rng.choice(CATEGORIES[category])
        others = [w for c, words in CATEGORIES.items() if c != category for w in words]
        options = rng.sample(others, 3) + [right]
        article = "an" if category[0] in "aeiou" else "a"
        question = f"Which of these is {article} {category}?"
    else:
        country = rng.choice(world)
        right = country.capital
        options = rng.sample([c.capital for c in world if c is not country], 3) + [right]
        question = f"Which city is the capital of {country.name}?"
    rng.shuffle(options)
    listed = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))
    return Item("mc", f"{question}\n{listed}", right, options=options, correct=options.index(right))


# ------------------------------------------------------------------------------ the suite


class Suite:
    """Disjoint train and test items per domain, drawn with `seed` from the fixed world."""

    def __init__(self, seed: int = 0, train_per_domain: int = 200, test_per_domain: int = 50):
        self.seed, self.train_per_domain, self.test_per_domain = seed, train_per_domain, test_per_domain
        self.world = make_world()
        rng = random.Random(f"suite:{seed}")
        self.train: list[Item] = []
        self.test: list[Item] = []
        n_train, n_test = train_per_domain, test_per_domain
        for domain, items in (("code", self._code(rng)), ("math", self._math(rng)),
                              ("knowledge", self._knowledge(rng)), ("mc", self._mc(rng))):
            if len(items) < n_train + n_test:
                raise ValueError(f"suite: domain {domain} has {len(items)} distinct items, asked for {n_train + n_test}")
            self.train += items[:n_train]
            self.test += items[n_train:n_train + n_test]

    def _code(self, rng):
        cands = code_candidates()
        rng.shuffle(cands)
        return [code_item(*c) for c in cands[: self.train_per_domain + self.test_per_domain]]

    def _math(self, rng):
        cands = math_candidates()
        rng.shuffle(cands)
        return [math_item(*c, rng) for c in cands[: self.train_per_domain + self.test_per_domain]]

    def _knowledge(self, rng):
        cands = [(c, r) for c in self.world for r in RELATIONS]
        rng.shuffle(cands)
        return [knowledge_item(c, r) for c, r in cands]

    def _mc(self, rng):
        seen, items = set(), []
        for _ in range(20 * (self.train_per_domain + self.test_per_domain)):
            item = mc_item(rng, self.world)
            if item.prompt not in seen:
                seen.add(item.prompt)
                items.append(item)
            if len(items) == self.train_per_domain + self.test_per_domain:
                break
        return items

    def rows(self, split: str = "train") -> list[dict]:
        return [item.row() for item in (self.train if split == "train" else self.test)]


def corpus(seed: int = WORLD_SEED, repeats: int = 12) -> list[str]:
    """Raw pre-training documents: facts, arithmetic, code and categories, in several phrasings.

    Facts recur `repeats` times in freshly shuffled company, so a model learns each fact rather
    than the order of a fixed document (which it would otherwise memorize)."""
    rng = random.Random(f"corpus:{seed}")
    world = make_world()
    docs = []
    for c in world:
        facts = [f"The capital of {c.name} is {c.capital}.", f"{c.capital} is the capital city of {c.name}.",
                 f"People in {c.name} speak {c.language}.", f"{c.language} is the language of {c.name}.",
                 f"{c.name} exports {c.export}.", f"The main export of {c.name} is {c.export}."]
        for _ in range(max(1, repeats // 3)):
            rng.shuffle(facts)
            docs.append(" ".join(facts))
    # Arithmetic facts in short, shuffled documents (not tables, so a fact is recalled without its neighbours).
    facts = []
    for op, word in (("+", "plus"), ("-", "minus"), ("*", "times")):
        for a in range(0, 10):
            for b in range(0, 10):
                if op == "-" and b > a:
                    continue
                v = _apply(op, a, b)
                facts.append(rng.choice([f"{a} {word} {b} is {v}.", f"{a} {op} {b} = {v}."]))
    for _ in range(repeats):
        rng.shuffle(facts)
        docs += [" ".join(facts[i:i + 8]) for i in range(0, len(facts), 8)]
    # Narrative counting stories (not questions): the base knows what the word problems talk about.
    for _ in range(50 * repeats):
        a, b, who, thing = rng.randint(2, 9), rng.randint(2, 9), rng.choice(WHO), rng.choice(THINGS)
        docs.append(rng.choice([
            f"{who} had {a} {thing}s and then got {b} more, so {who} ended up with {a + b} {thing}s.",
            f"{who} had {max(a, b)} {thing}s and gave {min(a, b)} away, which left {max(a, b) - min(a, b)}.",
            f"{a} bags with {b} {thing}s each hold {a * b} {thing}s in all.",
        ]))
    for fi, (desc, body, params, needs_k, _) in enumerate(CODE_FAMILIES):
        for name in FUNC_NAMES:
            for _ in range(2):
                p = rng.choice(params)
                k = rng.randint(1, 9) if needs_k else None
                docs.append(f"# This function {desc.format(p=p, k=k)}.\ndef {name}({p}):\n    {body.format(p=p, k=k)}\n")
    for category, words in CATEGORIES.items():
        for w in words:
            a, b = ("An" if w[0] in "aeiou" else "A"), ("an" if category[0] in "aeiou" else "a")
            docs.append(f"{a} {w} is {b} {category}. The {w} is one kind of {category}.")
    rng.shuffle(docs)
    return docs
