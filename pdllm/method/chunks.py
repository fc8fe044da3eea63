"""Splitting a context into chunks, and the content hash that names a chunk's KV everywhere (cache, Redis index)."""

from __future__ import annotations

import hashlib
import struct

from pdllm.errors import InvalidRequest
from pdllm.observability.counters import count

CHUNK_ID_VERSION = 1  # bump when what a chunk's KV holds changes, so stale KV never matches


def split_chunks(context_ids: list[int], chunk_size: int) -> list[list[int]]:
    """Consecutive chunks of `chunk_size` tokens; the last one may be shorter; an empty context has none."""
    if chunk_size < 1:
        raise InvalidRequest(f"chunk_size must be >= 1, got {chunk_size}")
    return [list(context_ids[i : i + chunk_size]) for i in range(0, len(context_ids), chunk_size)]


def chunk_id(model_id: str, tokens: list[int], chunk_size: int, use_bos: bool) -> str:
    """sha256 hex of (model, chunking parameters, tokens): equal ids mean interchangeable KV."""
    count("chunk_id")
    h = hashlib.sha256()
    h.update(f"pdllm-chunk/v{CHUNK_ID_VERSION}\0{model_id}\0{chunk_size}\0{int(bool(use_bos))}\0".encode())
    h.update(struct.pack(f"<{len(tokens)}q", *tokens))
    return h.hexdigest()
