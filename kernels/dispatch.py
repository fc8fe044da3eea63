"""One interface for callers: the Triton kernels on CUDA tensors, the PyTorch references on CPU.

`backend="triton"` on CPU tensors runs the kernels in Triton's interpreter, which must be switched on with
TRITON_INTERPRET=1 (the tests do this); otherwise asking for it is an error rather than a silent fallback."""

from __future__ import annotations

from torch import Tensor

from ._jit import interpreting
from .reference import chunk_token_scores_ref, sparse_chunk_attention_ref

BACKENDS = ("triton", "torch")


def pick_backend(device_is_cuda: bool, backend: str | None) -> str:
    """Resolve `backend` (None: triton on CUDA, torch elsewhere) and check that it can run here."""
    if backend is None:
        return "triton" if device_is_cuda else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    if backend == "triton" and not device_is_cuda and not interpreting():
        raise ValueError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 (Triton's interpreter)")
    return backend


def attention(
    q: Tensor,
    k_self: Tensor,
    v_self: Tensor,
    self_len: Tensor,
    k_pool: Tensor,
    v_pool: Tensor,
    sel_idx: Tensor,
    sel_len: Tensor,
    sm_scale: float | None = None,
    backend: str | None = None,
) -> Tensor:
    """Sparse chunk attention (see `sparse_chunk_attention`) on the backend that suits the tensors' device."""
    args = (q, k_self, v_self, self_len, k_pool, v_pool, sel_idx, sel_len, sm_scale)
    if pick_backend(q.is_cuda, backend) == "torch":
        return sparse_chunk_attention_ref(*args)
    from .sparse_attention import sparse_chunk_attention

    return sparse_chunk_attention(*args)


def token_scores(
    q: Tensor, k_pool: Tensor, slots: Tensor, sm_scale: float | None = None, backend: str | None = None
) -> Tensor:
    """Per-token chunk relevance [N, Hkv, S] (see `chunk_token_scores`) on the backend that suits the device."""
    if pick_backend(q.is_cuda, backend) == "torch":
        return chunk_token_scores_ref(q, k_pool, slots, sm_scale)
    from .chunk_scoring import chunk_token_scores

    return chunk_token_scores(q, k_pool, slots, sm_scale)
