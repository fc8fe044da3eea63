"""Splitting a context into chunks, and the content hash that names a chunk's KV everywhere (cache, Redis index)."""

from __future__ import annotations

import hashlib
import struct

from pdllm.errors import InvalidRequest
from pdllm.method.boundaries import TextBreaks
from pdllm.method.config import MethodConfig
from pdllm.observability.counters import count

CHUNK_ID_VERSION = 1  # bump when what a chunk's KV holds changes, so stale KV never matches


def split_chunks(context_ids: list[int], chunk_size: int, breaks: TextBreaks | None = None) -> list[list[int]]:
    """Consecutive chunks of at most `chunk_size` tokens; an empty context has none. Without `breaks` every chunk
    but the last holds exactly `chunk_size`; with them each ends at the strongest border (sentence, clause, word)
    among its last half's positions, the latest of equal ones, so a chunk holds at least half of `chunk_size`."""
    if chunk_size < 1:
        raise InvalidRequest(f"chunk_size must be >= 1, got {chunk_size}")
    if breaks is None:
        return [list(context_ids[i : i + chunk_size]) for i in range(0, len(context_ids), chunk_size)]
    levels = breaks.levels(context_ids)
    chunks, start, least = [], 0, max(1, chunk_size - chunk_size // 2)
    while len(context_ids) - start > chunk_size:
        window = levels[start + least : start + chunk_size + 1]
        end = start + least + window.rfind(max(window))
        chunks.append(list(context_ids[start:end]))
        start = end
    if start < len(context_ids):
        chunks.append(list(context_ids[start:]))
    return chunks


def chunk_context(tokenizer, context_ids: list[int], method: MethodConfig) -> list[list[int]]:
    """The context's chunks as `method.chunking` cuts them: what the engine and the router's assembly both use."""
    breaks = TextBreaks.of(tokenizer) if method.chunking == "text" else None
    return split_chunks(context_ids, method.chunk_size, breaks)


def chunk_id(model_id: str, tokens: list[int], chunk_size: int, use_bos: bool) -> str:
    """sha256 hex of (model, chunking parameters, tokens): equal ids mean interchangeable KV."""
    count("chunk_id")
    h = hashlib.sha256()
    h.update(f"pdllm-chunk/v{CHUNK_ID_VERSION}\0{model_id}\0{chunk_size}\0{int(bool(use_bos))}\0".encode())
    h.update(struct.pack(f"<{len(tokens)}q", *tokens))
    return h.hexdigest()
