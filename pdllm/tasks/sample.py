"""One evaluation or training example: what the model reads, what it is asked, and what counts as right."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

TokenCounter = Callable[[str], int]


def byte_counter(text: str) -> int:
    """Tokens of the bundled byte-level tokenizer: one per UTF-8 byte."""
    return len(text.encode("utf-8"))


def needle_depth(rng: random.Random, depth: float | None) -> float:
    """The queried needle's depth: `depth` when given (a sweep), else a draw from `rng`. The draw happens either way,
    so a sweep's sample at every depth holds the same needles, values and wording as the sample drawn without one."""
    drawn = rng.random()
    return drawn if depth is None else depth


def tokenizer_counter(tokenizer) -> TokenCounter:
    """Count tokens with any Hugging Face tokenizer (no special tokens added)."""
    return lambda text: len(tokenizer(text, add_special_tokens=False).input_ids)


@dataclass(frozen=True)
class Sample:
    task: str
    context: str  # the document (the engine chunks it; each chunk gets a BOS anchor)
    question: str  # goes into prompt.QUESTION_TEMPLATE
    answers: tuple[str, ...]  # gold references in the official format of the task
    target: str  # what a trained model should emit after "Answer:" (training label)
    depth: float  # needle depth in [0, 1] (position of the queried needle in the haystack)
    length: int  # the requested prompt length in tokens
    meta: dict = field(default_factory=dict)
    instruction: str = ""  # the task's instruction, kept whole before the context (prompt.py)

    @property
    def prompt_text(self) -> str:
        """Instruction and context as one text: what a model without an instruction slot reads."""
        return self.instruction + self.context
