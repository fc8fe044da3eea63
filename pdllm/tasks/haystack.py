"""Fill a haystack to a token budget and hide needles in it at given depths, deterministically from a seed."""

from __future__ import annotations

import random

from pdllm.errors import InvalidRequest
from pdllm.tasks.prose import load_sentences
from pdllm.tasks.sample import TokenCounter

# InfiniteBench's passkey / number_string noise, repeated.
INFINITEBENCH_NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


def prose_sentences(rng: random.Random, split: str):
    """An endless run of consecutive corpus sentences starting at a random place (wraps around)."""
    sents = load_sentences(split)
    i = rng.randrange(len(sents))
    while True:
        yield sents[i]
        i = (i + 1) % len(sents)


def noise_sentences():
    while True:
        yield INFINITEBENCH_NOISE


def fill(units, budget: int, count: TokenCounter, sep: str = " ") -> list[str]:
    """Take units (sentences) while the joined text stays within `budget` tokens; then top up with words."""
    if budget < 0:
        raise InvalidRequest(f"target length leaves no room for the haystack (short by {-budget} tokens)")
    out: list[str] = []
    used = 0
    for unit in units:
        cost = count(unit + sep)
        if used + cost > budget:
            words = unit.split(" ")
            part: list[str] = []
            for w in words:
                c = count(w + " ")
                if used + c > budget:
                    break
                part.append(w)
                used += c
            if part:
                out.append(" ".join(part))
            break
        out.append(unit)
        used += cost
    return out


def insert_needles(units: list[str], needles: list[tuple[float, str]]) -> list[str]:
    """Insert each (depth, needle) between units at round(depth * len(units)); stable for equal depths."""
    out = list(units)
    n = len(units)
    for depth, needle in sorted(needles, key=lambda x: x[0], reverse=True):
        out.insert(round(min(max(depth, 0.0), 1.0) * n), needle)
    return out
