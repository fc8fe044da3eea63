"""Request assembly: the request's text to what the actors work on, once per request: the tokens (instruction,
context, question), the context's chunks and their ids (each chunk hashed here, once; the actors take the ids as
given)."""

from __future__ import annotations

from dataclasses import dataclass

from pdllm.method import MethodConfig, chunk_context, chunk_id
from pdllm.prompt import encode_request


@dataclass(frozen=True)
class Assembled:
    question_ids: list[int]
    instruction_ids: list[int]
    chunk_ids: list[str]  # one per chunk of the context, in document order (a repeated chunk repeats its id)
    chunks: dict[str, list[int]]  # each distinct chunk once: id -> tokens, in first-seen order
    context_tokens: int


def assemble(
    tokenizer,
    model_id: str,
    context: str,
    question: str,
    instruction: str,
    method: MethodConfig,
    max_context_tokens: int,
) -> Assembled:
    req = encode_request(tokenizer, context, question, max_context_tokens, instruction)
    pieces = chunk_context(tokenizer, req.context_ids, method)
    ids = [chunk_id(model_id, c, method.chunk_size, method.use_bos) for c in pieces]
    return Assembled(
        question_ids=req.question_ids,
        instruction_ids=list(req.instruction_ids or []),
        chunk_ids=ids,
        chunks=dict(zip(ids, pieces, strict=True)),
        context_tokens=len(req.context_ids),
    )
