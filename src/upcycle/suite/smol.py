"""The `smol` task mix: the built-in suite's four domains recalibrated for a real small model
(SmolLM2-135M-Instruct) under LoRA: `data.suite.mix=smol`.

The toy suite (tasks.py) is sized for a 2.6M-parameter base pre-trained on an invented world; on
SmolLM2 its code saturates and its knowledge is unanswerable. Here every domain asks for something
a 135M instruction model can do but does not do in the scored form before tuning:

    code       a chain of two or three integer operations described in words -> a Python function, scored by
               hidden tests in the sandbox (untuned, the model often misreads the chain or its order)
    math       two-step word problems of additions and one-digit products; the trained answer writes
               both steps ("3 * 4 = 12, 12 + 5 = 17") and the scorer reads the last number (untuned,
               the model starts a long explanation that the token budget cuts)
    knowledge  real-world facts the base model holds (capitals, chemical symbols, irregular past
               tenses, opposites) asked as questions whose answer must be the bare word, exact match;
               the rows teach the terse form on other facts of the same relations (untuned, the model
               answers in a sentence)
    mc         four options scored by log-likelihood of the option's text: half facts of the same
               pool, half "which word does not belong" (untuned: about half right, and chance)

Train and test items never share a question: each domain's candidate pool is enumerated, shuffled
with the seed and cut into disjoint parts; knowledge and mc split on the fact itself (a test
country's capital is in no training row, in any phrasing). The test items do not depend on
train_per_domain, so runs at different data sizes are scored on the same items.
"""

from __future__ import annotations

import random

from upcycle.suite.tasks import FUNC_NAMES, LETTERS, Item

MIX = "smol"
# Greedy tokens per domain: enough for the trained answer form, not for a chatty preamble.
MAX_NEW_TOKENS = {"code": 40, "math": 24, "knowledge": 8}


class SmolItem(Item):
    """A suite item that carries this mix's generation budget (eval/suite_eval.py reads it)."""

    @property
    def max_new_tokens(self) -> int:
        return MAX_NEW_TOKENS.get(self.domain, 0)

# ------------------------------------------------------------------------------ code

# (words with {k}, expression of v with {k}, values of k); the chain applies them left to right.
OPS = [
    ("adds {k}", "v + {k}", range(2, 10)),
    ("subtracts {k}", "v - {k}", range(2, 10)),
    ("multiplies by {k}", "v * {k}", range(2, 6)),
    ("squares it", "v * v", [None]),
    ("negates it", "-v", [None]),
    ("takes the remainder after division by {k}", "v % {k}", range(3, 8)),
    ("divides by {k} rounding down", "v // {k}", range(2, 5)),
    ("takes the absolute value", "abs(v)", [None]),
]
PARAMS = ["x", "n", "value", "num"]
CODE_INPUTS = [0, 3, -4, 7, 12]


def code_candidates(length: int = 2) -> list[tuple]:
    """Every chain of `length` operations (with their constants), no operation twice in a row."""
    steps = [(op, k) for op, (_, _, ks) in enumerate(OPS) for k in ks]
    chains = [()]
    for _ in range(length):
        chains = [c + (s,) for c in chains for s in steps if not c or c[-1][0] != s[0]]
    return chains


def code_item(chain: tuple, name: str, p: str) -> Item:
    words, expr = [], p
    for op, k in chain:
        w, e, _ = OPS[op]
        words.append(w.format(k=k))
        expr = e.format(k=k).replace("v", f"({expr})" if expr != p else p)
    desc = ", then ".join(words)
    source = f"def {name}({p}):\n    return {expr}\n"
    namespace: dict = {}
    exec(source, namespace)  # noqa: S102 - the mix's own reference solution, not model output
    tests = [f"assert {name}({x!r}) == {namespace[name](x)!r}" for x in CODE_INPUTS]
    prompt = f"Write a Python function {name}({p}) that takes {p}, {desc}, and returns the result."
    return SmolItem("code", prompt, source, entry_point=name, tests=tests)


# ------------------------------------------------------------------------------ math

# Two-step word problems of additions and one-digit multiplications (the base adds two numbers below 40
# right about 3 times in 4 and multiplies one-digit numbers almost always, but subtracts poorly; a
# whole expression at once it gets wrong): the trained answer is the two steps, "3 * 4 = 12, 12 + 5 = 17".
# (first step, second step, template): a step is (left, op, right), "p" the first step's result.
MATH_TEMPLATES = [
    (("a", "*", "b"), ("p", "+", "c"),
     "{who} buys {a} bags with {b} {thing}s in each and finds {c} more. How many {thing}s does {who} have?"),
    (("a", "+", "b"), ("p", "+", "c"),
     "{who} has {a} {thing}s, gets {b} more, then {c} more. How many {thing}s does {who} have?"),
    (("a", "+", "b"), ("p", "*", "c"),
     "{who} puts {a} red and {b} blue {thing}s in each of {c} bags. How many {thing}s are in the bags?"),
    (("b", "*", "c"), ("a", "+", "p"),
     "{who} has {a} {thing}s and buys {b} packs of {c} {thing}s. How many {thing}s does {who} have now?"),
]
WHO = ["Ana", "Ben", "Cora", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivan", "Jo"]
THINGS = ["apple", "book", "coin", "marble", "pencil", "shell", "stamp", "card"]


def _steps(ti: int, a: int, b: int, c: int) -> list[tuple[int, str, int, int]]:
    """The problem's two steps as (left, op, right, result)."""
    env = {"a": a, "b": b, "c": c}
    steps = []
    for left, op, right in MATH_TEMPLATES[ti][:2]:
        x, y = env[left], env[right]
        env["p"] = x * y if op == "*" else x + y
        steps.append((x, op, y, env["p"]))
    return steps


def math_candidates() -> list[tuple]:
    """Every (template, a, b, c) whose multiplications are of one-digit numbers."""
    out = []
    for ti in range(len(MATH_TEMPLATES)):
        for a in range(2, 20):
            for b in range(2, 10):
                for c in range(2, 10):
                    if all(x < 10 and y < 10 for x, op, y, _ in _steps(ti, a, b, c) if op == "*"):
                        out.append((ti, a, b, c))
    return out


def math_item(ti: int, a: int, b: int, c: int, rng: random.Random) -> Item:
    prompt = MATH_TEMPLATES[ti][2].format(who=rng.choice(WHO), thing=rng.choice(THINGS), a=a, b=b, c=c)
    steps = _steps(ti, a, b, c)
    answer = ", ".join(f"{x} {op} {y} = {r}" for x, op, y, r in steps)
    return SmolItem("math", prompt, answer, target=str(steps[-1][3]))


# ------------------------------------------------------------------------------ knowledge

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "United Kingdom": "London", "Ireland": "Dublin", "Belgium": "Brussels", "Netherlands": "Amsterdam",
    "Austria": "Vienna", "Switzerland": "Bern", "Poland": "Warsaw", "Czech Republic": "Prague", "Hungary": "Budapest",
    "Greece": "Athens", "Sweden": "Stockholm", "Norway": "Oslo", "Denmark": "Copenhagen", "Finland": "Helsinki",
    "Iceland": "Reykjavik", "Russia": "Moscow", "Ukraine": "Kyiv", "Romania": "Bucharest", "Bulgaria": "Sofia",
    "Serbia": "Belgrade", "Croatia": "Zagreb", "Turkey": "Ankara", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Nigeria": "Abuja", "Ethiopia": "Addis Ababa", "Morocco": "Rabat", "Ghana": "Accra", "Senegal": "Dakar",
    "Japan": "Tokyo", "China": "Beijing", "South Korea": "Seoul", "India": "New Delhi",
    "Pakistan": "Islamabad", "Bangladesh": "Dhaka", "Thailand": "Bangkok", "Vietnam": "Hanoi",
    "Indonesia": "Jakarta", "Philippines": "Manila", "Malaysia": "Kuala Lumpur", "Iran": "Tehran", "Iraq": "Baghdad",
    "Saudi Arabia": "Riyadh", "Afghanistan": "Kabul", "Nepal": "Kathmandu",
    "Australia": "Canberra", "New Zealand": "Wellington", "Canada": "Ottawa", "Mexico": "Mexico City", "Cuba": "Havana", "Brazil": "Brasilia", "Argentina": "Buenos Aires", "Chile": "Santiago",
    "Peru": "Lima", "Colombia": "Bogota", "Venezuela": "Caracas", "Ecuador": "Quito", "Uruguay": "Montevideo",
    "Jamaica": "Kingston", "Mongolia": "Ulaanbaatar", "Syria": "Damascus", "Lebanon": "Beirut", "Jordan": "Amman",
    "Qatar": "Doha", "Libya": "Tripoli", "Tunisia": "Tunis", "Algeria": "Algiers", "Sudan": "Khartoum",
    "Uganda": "Kampala", "Tanzania": "Dodoma", "Zimbabwe": "Harare", "Estonia": "Tallinn", "Latvia": "Riga",
    "Lithuania": "Vilnius", "Slovakia": "Bratislava", "Slovenia": "Ljubljana", "Albania": "Tirana",
}
SYMBOLS = {
    "hydrogen": "H", "helium": "He", "lithium": "Li", "carbon": "C", "nitrogen": "N", "oxygen": "O", "fluorine": "F",
    "neon": "Ne", "sodium": "Na", "magnesium": "Mg", "aluminium": "Al", "silicon": "Si", "phosphorus": "P",
    "sulfur": "S", "chlorine": "Cl", "argon": "Ar", "potassium": "K", "calcium": "Ca", "iron": "Fe", "copper": "Cu",
    "zinc": "Zn", "silver": "Ag", "gold": "Au", "mercury": "Hg", "lead": "Pb", "tin": "Sn", "nickel": "Ni",
    "uranium": "U", "iodine": "I", "platinum": "Pt", "cobalt": "Co", "manganese": "Mn", "chromium": "Cr",
    "titanium": "Ti", "boron": "B", "beryllium": "Be", "bromine": "Br", "krypton": "Kr", "xenon": "Xe", "radon": "Rn",
}
PAST = {
    "go": "went", "eat": "ate", "see": "saw", "take": "took", "give": "gave", "write": "wrote", "drive": "drove",
    "run": "ran", "swim": "swam", "sing": "sang", "drink": "drank", "begin": "began", "speak": "spoke",
    "break": "broke", "choose": "chose", "freeze": "froze", "steal": "stole", "wake": "woke", "ride": "rode",
    "rise": "rose", "fly": "flew", "grow": "grew", "know": "knew", "throw": "threw", "draw": "drew", "blow": "blew",
    "buy": "bought", "bring": "brought", "think": "thought", "fight": "fought", "teach": "taught", "catch": "caught",
    "sell": "sold", "tell": "told", "find": "found", "hold": "held", "stand": "stood", "understand": "understood",
    "feel": "felt", "keep": "kept", "sleep": "slept", "leave": "left", "meet": "met", "send": "sent", "spend": "spent",
    "build": "built", "lose": "lost", "make": "made", "pay": "paid", "say": "said", "sit": "sat", "win": "won",
    "come": "came", "become": "became", "forget": "forgot", "get": "got", "hear": "heard", "fall": "fell",
    "lead": "led", "light": "lit", "shoot": "shot", "dig": "dug", "hang": "hung", "bite": "bit", "hide": "hid",
    "shake": "shook", "wear": "wore", "tear": "tore", "swear": "swore", "bear": "bore", "sink": "sank",
    "ring": "rang", "spring": "sprang", "feed": "fed", "flee": "fled", "bleed": "bled", "seek": "sought",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "tall": "short", "fast": "slow", "happy": "sad", "light": "dark", "old": "young",
    "rich": "poor", "strong": "weak", "hard": "soft", "early": "late", "full": "empty", "open": "closed",
    "wet": "dry", "clean": "dirty", "thick": "thin", "wide": "narrow", "deep": "shallow", "loud": "quiet",
    "high": "low", "heavy": "light", "true": "false", "good": "bad", "right": "wrong", "first": "last",
    "up": "down", "in": "out", "left": "right", "north": "south", "east": "west", "day": "night", "win": "lose",
    "buy": "sell", "push": "pull", "love": "hate", "above": "below", "inside": "outside", "before": "after",
    "always": "never", "begin": "end", "friend": "enemy", "question": "answer", "male": "female", "alive": "dead",
    "ancient": "modern", "cheap": "expensive", "safe": "dangerous", "sweet": "sour", "entrance": "exit",
    "arrive": "depart", "accept": "reject", "increase": "decrease", "maximum": "minimum", "major": "minor",
}
# relation -> (facts, question phrasings); train and test use every phrasing, but never the same fact.
RELATIONS = {
    "capital": (CAPITALS, ["What is the capital of {x}?", "Name the capital city of {x}."]),
    "symbol": (SYMBOLS, ["What is the chemical symbol of {x}?", "Give the element symbol for {x}."]),
    "past": (PAST, ["What is the past tense of the verb '{x}'?", "Give the simple past of '{x}'."]),
    "opposite": (OPPOSITES, ["What is the opposite of '{x}'?", "Give an antonym of '{x}'."]),
}
ANSWER_STYLE = " Answer with one word or name only."


def knowledge_facts() -> list[tuple[str, str]]:
    return [(rel, key) for rel, (facts, _) in RELATIONS.items() for key in facts]


def knowledge_item(rel: str, key: str, rng: random.Random) -> Item:
    facts, phrasings = RELATIONS[rel]
    prompt = rng.choice(phrasings).format(x=key) + ANSWER_STYLE
    return SmolItem("knowledge", prompt, facts[key], target=facts[key])


# ------------------------------------------------------------------------------ multiple choice

# Two kinds, half each, scored by the log-likelihood of the option's text: a fact of the knowledge
# pool as a four-way question (the untuned model picks about half right), and the odd one out of four
# words (untuned: chance; it has the categories but not the question's form).
GROUPS = {
    "animal": ["dog", "cat", "horse", "rabbit", "eagle", "shark", "tiger", "sheep", "mouse", "whale"],
    "fruit": ["apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "plum", "orange", "pear"],
    "color": ["red", "blue", "green", "yellow", "purple", "black", "white", "brown", "pink", "gray"],
    "tool": ["hammer", "saw", "wrench", "shovel", "drill", "chisel", "ladder", "axe", "rake", "pliers"],
    "vehicle": ["car", "bus", "truck", "bicycle", "train", "boat", "plane", "tractor", "taxi", "scooter"],
    "body part": ["arm", "leg", "nose", "ear", "elbow", "knee", "finger", "ankle", "mouth", "neck"],
    "instrument": ["piano", "violin", "guitar", "drum", "flute", "trumpet", "harp", "cello", "banjo", "organ"],
    "clothing": ["shirt", "jacket", "sock", "scarf", "glove", "skirt", "coat", "sweater", "belt", "hat"],
}
FACT_QUESTIONS = {"capital": "Which city is the capital of {x}?", "symbol": "Which is the chemical symbol of {x}?",
                  "past": "Which is the past tense of '{x}'?", "opposite": "Which word is the opposite of '{x}'?"}


def _mc(question: str, right: str, wrong: list[str], rng: random.Random) -> Item:
    choices = wrong + [right]
    rng.shuffle(choices)
    listed = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    return SmolItem("mc", f"{question}\n{listed}", right, options=choices, correct=choices.index(right))


def mc_fact_item(rel: str, key: str, rng: random.Random) -> Item:
    """A fact as a four-way question; distractors are other answers of the same relation."""
    facts, _ = RELATIONS[rel]
    wrong = rng.sample(sorted({v for v in facts.values() if v != facts[key]}), 3)
    return _mc(FACT_QUESTIONS[rel].format(x=key), facts[key], wrong, rng)


def odd_one_out(rng: random.Random) -> tuple[str, tuple[str, ...], str]:
    """(group, three words of it, one word of another group)."""
    group, other = rng.sample(sorted(GROUPS), 2)
    return group, tuple(sorted(rng.sample(GROUPS[group], 3))), rng.choice(GROUPS[other])


def mc_odd_item(key: tuple, rng: random.Random) -> Item:
    _, three, odd = key
    return _mc("Which word does not belong with the others?", odd, list(three), rng)


# ------------------------------------------------------------------------------ the mix


class SmolSuite:
    """Disjoint train and test items per domain, drawn with `seed`; the interface of tasks.Suite.

    Knowledge and mc share one fact pool, split once: the first `test_per_domain` facts are the test
    facts of both domains (asked as a short answer and as a four-way question), the rest train both."""

    def __init__(self, seed: int = 0, train_per_domain: int = 40, test_per_domain: int = 100):
        self.seed, self.train_per_domain, self.test_per_domain = seed, train_per_domain, test_per_domain
        n_train, n_test = train_per_domain, test_per_domain
        self.train: list[Item] = []
        self.test: list[Item] = []

        def cut(name: str, pool: list, make, n_train: int, n_test: int) -> None:
            """Test items first, from a generator of their own: the test set does not depend on n_train."""
            if len(pool) < n_train + n_test:
                raise ValueError(f"suite mix {MIX}: {name} has {len(pool)} distinct items, "
                                 f"asked for {n_train + n_test} (train_per_domain + test_per_domain)")
            rng = random.Random(f"smol:{seed}:{name}")
            rng.shuffle(pool)
            self.test += [make(c, rng) for c in pool[:n_test]]
            self.train += [make(c, rng) for c in pool[n_test:n_test + n_train]]

        # code: half two-step chains (which LoRA nearly masters here), half three-step ones, against saturation
        def code(chain, rng):
            return code_item(chain, rng.choice(FUNC_NAMES), rng.choice(PARAMS))

        cut("code", code_candidates(2), code, n_train - n_train // 2, n_test - n_test // 2)
        cut("code3", code_candidates(3), code, n_train // 2, n_test // 2)
        cut("math", math_candidates(), lambda c, rng: math_item(*c, rng), n_train, n_test)
        rng = random.Random(f"smol:{seed}:facts")
        facts = knowledge_facts()
        rng.shuffle(facts)
        test_facts, train_facts = facts[:n_test], facts[n_test:]
        if len(train_facts) < n_train or len(test_facts) < n_test:
            raise ValueError(f"suite mix {MIX}: knowledge/mc share {len(facts)} facts, asked for {n_test} test "
                             f"facts and {n_train} training facts")
        self.test_facts, self.train_facts = set(test_facts), set(train_facts)
        # mc: half facts (test facts for test, training facts for training), half odd-one-out sets,
        # each set (group, words, odd word) in one split only; test items are drawn first
        fact_test, fact_train = n_test // 2, n_train // 2
        self.test += [knowledge_item(*f, rng) for f in test_facts]
        mc_test = [mc_fact_item(*f, rng) for f in test_facts[:fact_test]]
        self.train += [knowledge_item(*f, rng) for f in rng.sample(train_facts, n_train)]
        mc_train = [mc_fact_item(*f, rng) for f in rng.sample(train_facts, fact_train)]
        odd = random.Random(f"smol:{seed}:odd")
        self.odd_sets: dict[str, list[tuple]] = {"test": [], "train": []}
        for split, count, items in (("test", n_test - fact_test, mc_test), ("train", n_train - fact_train, mc_train)):
            while len(self.odd_sets[split]) < count:  # test first, so the test set does not depend on n_train
                key = odd_one_out(odd)
                if key not in self.odd_sets["test"] and key not in self.odd_sets["train"]:
                    self.odd_sets[split].append(key)
                    items.append(mc_odd_item(key, odd))
        self.test += mc_test
        self.train += mc_train

    def rows(self, split: str = "train") -> list[dict]:
        return [item.row() for item in (self.train if split == "train" else self.test)]
