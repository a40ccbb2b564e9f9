"""A small invented world, generated from a seed: the facts the suite's base model learns in pre-training.

Countries with a capital, a language and an export; fixed word lists for category questions.
The world is fixed (WORLD_SEED) because the bundled base model was pre-trained on it; the task
items drawn from it vary with the experiment seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

WORLD_SEED = 1234
ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gl", "kr", "pl", "st", "tr"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]
CODAS = ["", "", "n", "r", "l", "s", "k", "m"]
PRODUCTS = ["salt", "copper", "wool", "tea", "glass", "silk", "rice", "timber", "honey", "iron", "olives", "paper"]
CATEGORIES = {
    "animal": ["dog", "cat", "horse", "rabbit", "eagle", "shark", "tiger", "sheep", "mouse", "whale"],
    "fruit": ["apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "plum", "orange", "pear"],
    "color": ["red", "blue", "green", "yellow", "purple", "black", "white", "brown", "pink", "gray"],
    "tool": ["hammer", "saw", "wrench", "shovel", "drill", "chisel", "ladder", "axe", "rake", "pliers"],
    "vehicle": ["car", "bus", "truck", "bicycle", "train", "boat", "plane", "tractor", "taxi", "scooter"],
}


@dataclass(frozen=True)
class Country:
    name: str
    capital: str
    language: str
    export: str


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) for _ in range(syllables))


def make_world(num_countries: int = 100, seed: int = WORLD_SEED) -> list[Country]:
    rng = random.Random(seed)
    used: set[str] = set()

    def fresh(syllables: int, suffix: str = "") -> str:
        while True:
            w = (_word(rng, syllables) + suffix).capitalize()
            if w not in used:
                used.add(w)
                return w

    return [Country(fresh(2, "ia"), fresh(2), fresh(2, "ish"), rng.choice(PRODUCTS)) for _ in range(num_countries)]
