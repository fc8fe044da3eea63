"""Chunk ranking by the configured scoring: key summaries (selection.py, reads summaries only) or draft likelihood
(draft_scoring.py, reads each chunk's cached KV)."""

from __future__ import annotations

from pdllm.method.chunk_kv import ChunkKV
from pdllm.method.config import MethodConfig
from pdllm.method.draft_scoring import rank_by_draft
from pdllm.method.selection import rank_chunks


def rank(
    lm, question_ids: list[int], chunks: list[ChunkKV], cfg: MethodConfig, instruction: ChunkKV | None = None
) -> tuple[list[int], dict]:
    """Indices of the top-K chunks in document order, and the ranking's statistics."""
    if not chunks:
        return [], {"scoring": cfg.scoring}
    if cfg.scoring == "draft":
        picked, stats = rank_by_draft(lm, question_ids, chunks, cfg.top_k, instruction, cfg)
        return picked, {"scoring": "draft", **stats}
    return rank_chunks(lm, question_ids, [c.summary for c in chunks], cfg.top_k), {"scoring": "summary"}
