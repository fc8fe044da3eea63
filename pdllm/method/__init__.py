"""Predictive prefilling in one process: chunked prefill with BOS anchors, top-K chunk selection with intra-chunk
token sparsity, and denoising over only the question and the generated block against the selected cached KV.

The cluster's prefill and decode actors call the same functions: `encode_chunks` (prefill) and `rank_chunks`
(decode); the denoising over the selected KV is the decode engine's (pdllm.decode_node.engine)."""

from pdllm.method.chunk_cache import ChunkCache
from pdllm.method.chunk_kv import ChunkKV
from pdllm.method.chunks import chunk_context, chunk_id, split_chunks
from pdllm.method.config import MethodConfig
from pdllm.method.prefill import encode_chunks
from pdllm.method.selection import chunk_scores, rank_chunks

__all__ = [
    "ChunkCache",
    "ChunkKV",
    "MethodConfig",
    "chunk_context",
    "chunk_id",
    "chunk_scores",
    "encode_chunks",
    "rank_chunks",
    "split_chunks",
]
