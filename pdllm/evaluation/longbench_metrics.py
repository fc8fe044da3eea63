"""LongBench's official metrics (THUDM/LongBench metrics.py, re-implemented): token F1 for QA, ROUGE-L for
summaries, classification accuracy over the task's classes, passage count / retrieval matches, and edit
similarity of the first code line. Each returns 0..1 for one prediction against one reference."""

from __future__ import annotations

import difflib
import re
import string
from collections import Counter


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD's normalisation)."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction_tokens: list[str], reference_tokens: list[str]) -> float:
    common = Counter(prediction_tokens) & Counter(reference_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction_tokens), same / len(reference_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, reference: str, **_) -> float:
    return token_f1(normalize_answer(prediction).split(), normalize_answer(reference).split())


def _lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_score(prediction: str, reference: str, **_) -> float:
    """ROUGE-L F1 over whitespace tokens (the `rouge` package's rouge-l f, which LongBench reports)."""
    p, r = prediction.split(), reference.split()
    if not p or not r:
        return 0.0
    lcs = _lcs(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def classification_score(prediction: str, reference: str, all_classes: list[str] | None = None, **_) -> float:
    """1/len(matches) if the reference class is among the class names found in the prediction (names that are
    only part of the reference do not count as matches)."""
    matches = [c for c in (all_classes or []) if c in prediction]
    matches = [m for m in matches if not (m in reference and m != reference)]
    return 1.0 / len(matches) if reference in matches else 0.0


def count_score(prediction: str, reference: str, **_) -> float:
    numbers = re.findall(r"\d+", prediction)
    return sum(n == str(reference) for n in numbers) / len(numbers) if numbers else 0.0


def retrieval_score(prediction: str, reference: str, **_) -> float:
    wanted = re.findall(r"Paragraph (\d+)", reference)
    numbers = re.findall(r"\d+", prediction)
    if not wanted or not numbers:
        return 0.0
    return sum(n == wanted[0] for n in numbers) / len(numbers)


def code_sim_score(prediction: str, reference: str, **_) -> float:
    """Edit similarity (fuzz.ratio / 100) of the reference and the prediction's first line that is not a
    comment or fence."""
    line = next((x for x in prediction.lstrip("\n").split("\n") if not x.lstrip().startswith(("`", "#", "//"))), "")
    return round(100 * difflib.SequenceMatcher(None, line, reference).ratio()) / 100
