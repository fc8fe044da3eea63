"""The official metrics: InfiniteBench's compute_scores.py rules and RULER's string_match_all."""

from __future__ import annotations

import re


def first_int_match(prediction: str) -> str:
    """InfiniteBench: the first run of digits in the prediction ('' when none)."""
    match = re.search(r"\d+", prediction)
    return match.group(0) if match else ""


def passkey_score(prediction: str, answers: tuple[str, ...]) -> float:
    """InfiniteBench passkey and number_string: the first integer equals the label."""
    return float(first_int_match(prediction) == answers[0])


def kv_retrieval_score(prediction: str, answers: tuple[str, ...]) -> float:
    """InfiniteBench kv_retrieval: the label is one of the prediction's words after punctuation is blanked."""
    for ch in ("\n", ":", '"', "'", ".", ",", "?", "!", "{", "}"):
        prediction = prediction.replace(ch, " ")
    return float(answers[0] in prediction.split())


def string_match_all(prediction: str, answers: tuple[str, ...]) -> float:
    """RULER: the fraction of references that appear (case-insensitively) in the prediction."""
    pred = prediction.lower()
    return sum(ref.lower() in pred for ref in answers) / len(answers)
