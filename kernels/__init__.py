"""Triton kernels (sparse attention over non-contiguous chunk KV, chunk scoring) and their PyTorch references.

Callers use the dispatchers `attention` and `token_scores`: Triton on CUDA tensors, the references on CPU. Triton
itself is imported only when a kernel is first used."""

from .dispatch import attention, pick_backend, token_scores
from .reference import chunk_token_scores_ref, gather_selected, sparse_chunk_attention_ref

__all__ = [
    "attention",
    "chunk_token_scores_ref",
    "gather_selected",
    "pick_backend",
    "sparse_chunk_attention_ref",
    "token_scores",
]
