"""How a request becomes tokens: an instruction (kept whole, never chunked), the context (chunked later) and the
question span decoded after it.

A prompt template such as LongBench's "<instruction>{context}<query>" is split at its context slot
(`split_template`): the text before it is the instruction, the text after it the question template. The instruction
sits at positions 0..P-1 right after BOS in every mode and is never dropped by chunk selection.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pdllm.context_tokens import context_tokens_for
from pdllm.errors import InvalidRequest

QUESTION_TEMPLATE = "\n\nQuestion: {question}\nAnswer:"
DEFAULT_MAX_CONTEXT_TOKENS = 131072
MAX_INSTRUCTION_TOKENS = 4096


@dataclass(frozen=True)
class EncodedRequest:
    context_ids: list[int]  # the document, without BOS (chunking adds one per chunk)
    question_ids: list[int]  # the templated question: the span every decode step recomputes
    instruction_ids: list[int] = field(default_factory=list)  # kept before the context, never chunked


@dataclass(frozen=True)
class PromptTemplate:
    instruction: str  # text before the context
    question: str  # text after the context, with a {question} slot (or none: a fixed query)


def split_template(template: str, slot: str = "{context}") -> PromptTemplate:
    """Split "<instruction>{context}<query>" at its context slot; other {name} slots stay in the query part."""
    if template.count(slot) != 1:
        raise InvalidRequest(f"template must contain {slot} exactly once")
    before, after = template.split(slot)
    return PromptTemplate(instruction=before, question=after)


def encode_request(
    tokenizer,
    context: str,
    question: str,
    max_context_tokens: int = DEFAULT_MAX_CONTEXT_TOKENS,
    instruction: str = "",
    question_template: str = QUESTION_TEMPLATE,
) -> EncodedRequest:
    if not isinstance(question, str) or not question.strip():
        raise InvalidRequest("question is empty")
    if not isinstance(context, str):
        raise InvalidRequest("context must be text")
    if not isinstance(instruction, str):
        raise InvalidRequest("instruction must be text")
    if not isinstance(question_template, str) or "{question}" not in question_template:
        raise InvalidRequest("question_template must contain {question}")
    context_ids = context_tokens_for(tokenizer).ids(tokenizer, context) if context else []
    if len(context_ids) > max_context_tokens:
        raise InvalidRequest(
            f"context has {len(context_ids)} tokens, more than the configured maximum of {max_context_tokens}"
        )
    instruction_ids = tokenizer(instruction, add_special_tokens=False).input_ids if instruction else []
    if len(instruction_ids) > MAX_INSTRUCTION_TOKENS:
        raise InvalidRequest(
            f"instruction has {len(instruction_ids)} tokens, more than the maximum of {MAX_INSTRUCTION_TOKENS}"
        )
    question_ids = tokenizer(question_template.replace("{question}", question.strip()), add_special_tokens=False)
    return EncodedRequest(context_ids=context_ids, question_ids=question_ids.input_ids, instruction_ids=instruction_ids)
