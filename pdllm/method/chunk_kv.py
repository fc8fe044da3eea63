"""One encoded chunk: its per-layer K/V at chunk-local positions and the small summary used to rank it."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class ChunkKV:
    chunk_id: str
    tokens: list[int]  # without BOS
    k: Tensor  # [num_layers, num_kv_heads, S, head_dim], S = len(tokens) + has_bos; RoPE at positions 0..S-1
    v: Tensor
    summary: Tensor  # [summary_layers, num_kv_heads, head_dim]: mean un-rotated key of the chunk's tokens
    has_bos: bool

    @property
    def length(self) -> int:
        """Rows of K/V (tokens plus the BOS anchor if any)."""
        return self.k.shape[2]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.summary))
