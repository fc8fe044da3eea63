"""What a layer's queries attend to, kept outside the model so one forward serves every mode.

The model computes q/k/v for the span it runs (with the position ids it is given) and hands them to an
`AttentionContext`. The context decides what else the span sees: nothing (vanilla), every cached context token
(prefix cache), or a sparse selection of cached chunk tokens read through the Triton kernel (ours).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor
from torch.nn import functional as F


class AttentionContext(Protocol):
    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q: [B, Hq, T, D]; k, v: [B, Hkv, T, D] (RoPE applied). Returns [B, Hq, T, D]."""
        ...


def sdpa(q: Tensor, k: Tensor, v: Tensor, key_valid: Tensor | None = None) -> Tensor:
    """Bidirectional attention with GQA; key_valid [B, S] bool masks padded keys."""
    mask = None if key_valid is None else key_valid[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])


class SelfAttention:
    """The span attends only to itself (vanilla full recompute, chunk prefill)."""

    def __init__(self, key_valid: Tensor | None = None) -> None:
        self.key_valid = key_valid

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return sdpa(q, k, v, self.key_valid)


class DenseCachedAttention:
    """The span attends to all of a cached prefix (per layer [B, Hkv, S, D]) plus itself: the prefix-cache mode."""

    def __init__(self, kv: Sequence[tuple[Tensor, Tensor]], prefix_valid: Tensor | None = None) -> None:
        self.kv = kv
        self.prefix_valid = prefix_valid

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        pk, pv = self.kv[layer]
        key_valid = None
        if self.prefix_valid is not None:
            own = torch.ones(q.shape[0], k.shape[2], dtype=torch.bool, device=q.device)
            key_valid = torch.cat([self.prefix_valid, own], dim=1)
        return sdpa(q, torch.cat([pk.to(k.dtype), k], dim=2), torch.cat([pv.to(v.dtype), v], dim=2), key_valid)
