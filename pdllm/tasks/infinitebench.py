"""InfiniteBench `passkey`, `number_string` and `kv_retrieval`, generated in the benchmark's own formats.

Texts follow InfiniteBench's data (the passkey/number_string noise, the needle sentences, the JSON of UUID pairs and
the `input` questions); scoring follows its compute_scores.py (see metrics.py). The haystack may also be prose from
our corpus instead of the repeated noise (`haystack="prose"`), which is how the training mix varies it.
"""

from __future__ import annotations

import json
import random
import re
import uuid

from pdllm.prompt import QUESTION_TEMPLATE
from pdllm.tasks.haystack import fill, insert_needles, noise_sentences, prose_sentences
from pdllm.tasks.sample import Sample, TokenCounter, needle_depth

RETRIEVE_PREFIX = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
KV_PREFIX = "Extract the value corresponding to the specified key in the JSON object below."
KV_QUESTION = 'Key: "{key}"\nThe value associated with the specified key is:'


def _fixed_cost(count: TokenCounter, question: str, *parts: str) -> int:
    return 1 + count(QUESTION_TEMPLATE.format(question=question)) + sum(count(p) for p in parts)


def _haystack(rng: random.Random, haystack: str, split: str):
    return noise_sentences() if haystack == "noise" else prose_sentences(rng, split)


def _digit_task(
    task: str,
    needle_fmt: str,
    question: str,
    digits: int,
    length: int,
    seed: int,
    count: TokenCounter,
    depth: float | None,
    haystack: str,
    split: str,
) -> Sample:
    rng = random.Random(f"{task}:{length}:{seed}")
    value = str(rng.randrange(10 ** (digits - 1), 10**digits))
    depth = needle_depth(rng, depth)
    needle = needle_fmt.format(value=value)
    budget = length - _fixed_cost(count, question, RETRIEVE_PREFIX + "\n\n", needle + " ")
    units = fill(_haystack(rng, haystack, split), budget, count)
    context = " ".join(insert_needles(units, [(depth, needle)]))
    meta = {"haystack": haystack}
    return Sample(task, context, question, (value,), " " + value, depth, length, meta, RETRIEVE_PREFIX + "\n\n")


def passkey(
    length: int,
    seed: int,
    count: TokenCounter,
    depth: float | None = None,
    haystack: str = "noise",
    split: str = "heldout",
    digits: int = 5,
) -> Sample:
    """`digits` other than InfiniteBench's 5 only for training (longer values: more copying per example)."""
    fmt = "The pass key is {value}. Remember it. {value} is the pass key."
    return _digit_task("passkey", fmt, "What is the pass key?", digits, length, seed, count, depth, haystack, split)


def number_string(
    length: int,
    seed: int,
    count: TokenCounter,
    depth: float | None = None,
    haystack: str = "noise",
    split: str = "heldout",
    digits: int = 10,
) -> Sample:
    fmt = "The sequence of digits is {value}. Remember it. {value} is the sequence of digits."
    question = "What is the sequence of number?"
    return _digit_task("number_string", fmt, question, digits, length, seed, count, depth, haystack, split)


def kv_retrieval(
    length: int,
    seed: int,
    count: TokenCounter,
    depth: float | None = None,
    haystack: str = "json",
    split: str = "heldout",
) -> Sample:
    """A JSON object of random UUID pairs filled to `length`; the question names one key at `depth`."""
    rng = random.Random(f"kv_retrieval:{length}:{seed}")
    new_uuid = lambda: str(uuid.UUID(int=rng.getrandbits(128), version=4))
    depth = needle_depth(rng, depth)
    probe_key = new_uuid()
    question = KV_QUESTION.format(key=probe_key)
    budget = length - _fixed_cost(count, question, KV_PREFIX + "\n\nJSON data:\n{}")
    pair_cost = count(json.dumps({probe_key: probe_key})) - 2 + 2  # '"k": "v"' plus the ", " separator
    pairs = max(1, budget // pair_cost)
    keys = [new_uuid() for _ in range(pairs)]
    keys[min(round(depth * (pairs - 1)), pairs - 1)] = probe_key
    data = {k: new_uuid() for k in keys}
    text = json.dumps(data, ensure_ascii=False)
    while count(text) > budget + 2 and len(data) > 1:  # a tokenizer that merges differently: drop from the end
        data.pop(next(k for k in reversed(data) if k != probe_key))
        text = json.dumps(data, ensure_ascii=False)
    value = data[probe_key]
    meta, instruction = {"pairs": len(data)}, KV_PREFIX + "\n\nJSON data:\n"
    return Sample("kv_retrieval", text, question, (value,), " " + value, depth, length, meta, instruction)


def kv_other_questions(sample: Sample) -> list[tuple[str, str]]:
    """(question, value) for every key of a kv_retrieval sample's JSON other than the one it asks about: training
    asks several of them about one context, so only matching the key tells the answers apart."""
    data = json.loads(sample.context)
    return [(KV_QUESTION.format(key=k), v) for k, v in data.items() if v != sample.answers[0]]


PAIR_BYTES = re.compile(rb'"([0-9a-f-]{36})": "([0-9a-f-]{36})"')


def kv_key_spans(sample: Sample) -> list[tuple[int, int, int, int]]:
    """(key start, key end, value start, value end) byte offsets of every pair in a kv_retrieval prompt."""
    return [(*m.span(1), *m.span(2)) for m in PAIR_BYTES.finditer(sample.prompt_text.encode())]
