"""Synthetic long-context tasks in the official formats, deterministic from a seed, at any length in tokens.

`make_sample(task, length, seed)` builds one example; `score(task, prediction, answers)` applies the task's
official metric (0..1). Length counts the whole prompt the engine builds: BOS + context + templated question.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pdllm.errors import InvalidRequest
from pdllm.tasks import facts, infinitebench, metrics, ruler
from pdllm.tasks.sample import Sample, TokenCounter, byte_counter, tokenizer_counter


@dataclass(frozen=True)
class TaskDef:
    make: Callable[..., Sample]
    score: Callable[[str, tuple[str, ...]], float]
    gen_length: int  # answer span the model denoises (answer + end tokens)


TASKS: dict[str, TaskDef] = {
    "passkey": TaskDef(infinitebench.passkey, metrics.passkey_score, 16),
    "number_string": TaskDef(infinitebench.number_string, metrics.passkey_score, 16),
    "kv_retrieval": TaskDef(infinitebench.kv_retrieval, metrics.kv_retrieval_score, 48),
    "niah_single": TaskDef(ruler.niah_single, metrics.string_match_all, 16),
    "niah_multikey": TaskDef(ruler.niah_multikey, metrics.string_match_all, 16),
    "facts": TaskDef(facts.facts, metrics.kv_retrieval_score, 48),
    "heldout_wording": TaskDef(facts.heldout_wording, metrics.kv_retrieval_score, 48),
    "value_kinds": TaskDef(facts.value_kinds, metrics.kv_retrieval_score, 48),
}
HELDOUT_TASKS = ("heldout_wording",)  # evaluation only: its paraphrase families never appear in training data
MIN_LENGTH = 640


def task_def(task: str) -> TaskDef:
    if task not in TASKS:
        raise InvalidRequest(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    return TASKS[task]


def make_sample(
    task: str, length: int, seed: int, count: TokenCounter = byte_counter, depth: float | None = None, **kw
) -> Sample:
    """One example of `task` whose prompt is at most `length` tokens (by `count`), needle at `depth` (or random)."""
    if length < MIN_LENGTH:
        raise InvalidRequest(f"length must be >= {MIN_LENGTH} tokens, got {length}")
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise InvalidRequest(f"depth must be in [0, 1], got {depth}")
    return task_def(task).make(length, seed, count, depth, **kw)


def score(task: str, prediction: str, answers: tuple[str, ...]) -> float:
    return task_def(task).score(prediction, answers)


def metric_name(task: str) -> str:
    """The name of the task's official metric, printed beside its score (passkey_score, string_match_all, ...)."""
    return task_def(task).score.__name__


__all__ = [
    "HELDOUT_TASKS",
    "TASKS",
    "Sample",
    "TaskDef",
    "byte_counter",
    "make_sample",
    "metric_name",
    "score",
    "task_def",
    "tokenizer_counter",
]
