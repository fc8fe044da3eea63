"""How a request becomes tokens: the context (chunked later) and the question span decoded after it."""

from __future__ import annotations

from dataclasses import dataclass

from pdllm.errors import InvalidRequest

QUESTION_TEMPLATE = "\n\nQuestion: {question}\nAnswer:"
DEFAULT_MAX_CONTEXT_TOKENS = 131072


@dataclass(frozen=True)
class EncodedRequest:
    context_ids: list[int]  # the document, without BOS (chunking adds one per chunk)
    question_ids: list[int]  # the templated question: the span every decode step recomputes


def encode_request(
    tokenizer, context: str, question: str, max_context_tokens: int = DEFAULT_MAX_CONTEXT_TOKENS
) -> EncodedRequest:
    if not isinstance(question, str) or not question.strip():
        raise InvalidRequest("question is empty")
    if not isinstance(context, str):
        raise InvalidRequest("context must be text")
    context_ids = tokenizer(context, add_special_tokens=False).input_ids if context else []
    if len(context_ids) > max_context_tokens:
        raise InvalidRequest(
            f"context has {len(context_ids)} tokens, more than the configured maximum of {max_context_tokens}"
        )
    question_ids = tokenizer(QUESTION_TEMPLATE.format(question=question.strip()), add_special_tokens=False).input_ids
    return EncodedRequest(context_ids=context_ids, question_ids=question_ids)
