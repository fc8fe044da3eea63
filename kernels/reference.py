"""Plain PyTorch references for the kernels: gather, concat, masked softmax. They define what the kernels compute and
serve as the CPU path, so they are vectorised over batch and heads (no Python loop over tokens)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half types are upcast to float32 (the kernels accumulate in float32); float64 stays exact for tests."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def gather_selected(pool: Tensor, sel_idx: Tensor, sel_len: Tensor) -> Tensor:
    """Rows of a chunk pool [slots, Hkv, S, D] named by flat indices sel_idx [B, Hkv, N] -> [B, Hkv, N, D].

    Entries at or beyond sel_len may hold anything (even out-of-range values): they are read as row 0 and must be
    masked by the caller."""
    _, hkv, s, _ = pool.shape
    n = sel_idx.shape[-1]
    valid = torch.arange(n, device=sel_idx.device)[None, :] < sel_len[:, None].to(sel_idx.device)  # [B, N]
    idx = torch.where(valid[:, None, :], sel_idx.long(), 0)
    head = torch.arange(hkv, device=pool.device)[None, :, None]
    return pool[idx // s, head, idx % s]


def sparse_chunk_attention_ref(
    q: Tensor,
    k_self: Tensor,
    v_self: Tensor,
    self_len: Tensor,
    k_pool: Tensor,
    v_pool: Tensor,
    sel_idx: Tensor,
    sel_len: Tensor,
    sm_scale: float | None = None,
) -> Tensor:
    """Attention of the span's queries to [selected pool rows ++ the span's own keys], masked, GQA-grouped.

    A query row with no valid key at all (sel_len = self_len = 0) gets zeros, as the kernel writes."""
    b, hq, tq, d = q.shape
    hkv = k_self.shape[1]
    group = hq // hkv
    n = sel_idx.shape[-1]
    scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    cdt = _compute_dtype(q.dtype)

    keys = torch.cat([gather_selected(k_pool, sel_idx, sel_len).to(cdt), k_self.to(cdt)], dim=2)  # [B, Hkv, N+Tq, D]
    vals = torch.cat([gather_selected(v_pool, sel_idx, sel_len).to(cdt), v_self.to(cdt)], dim=2)
    dev = q.device
    valid = torch.cat(
        [
            torch.arange(n, device=dev)[None, :] < sel_len.to(dev)[:, None],
            torch.arange(tq, device=dev)[None, :] < self_len.to(dev)[:, None],
        ],
        dim=1,
    )  # [B, N+Tq]

    qg = q.to(cdt).reshape(b, hkv, group * tq, d)  # query heads of one KV group share its keys
    scores = torch.matmul(qg, keys.transpose(-1, -2)) * scale  # [B, Hkv, G*Tq, N+Tq]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all-masked rows -> zeros
    out = torch.matmul(probs, vals)  # [B, Hkv, G*Tq, D]
    return out.reshape(b, hq, tq, d).to(q.dtype)


def chunk_token_scores_ref(
    q: Tensor, k_pool: Tensor, slots: Tensor, sm_scale: float | None = None, slots_per_step: int = 64
) -> Tensor:
    """Per-token relevance [N, Hkv, S] float32: max over query tokens and the KV group's query heads of q.k * scale.

    Slots are scored `slots_per_step` at a time so memory stays bounded for thousands of chunks."""
    hq, tq, d = q.shape
    _, hkv, s, _ = k_pool.shape
    group = hq // hkv
    scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    cdt = _compute_dtype(q.dtype)
    qg = q.to(cdt).reshape(hkv, group * tq, d)
    out = torch.empty(slots.numel(), hkv, s, dtype=torch.float32, device=q.device)
    for lo in range(0, slots.numel(), slots_per_step):
        keys = k_pool[slots[lo : lo + slots_per_step].long()].to(cdt)  # [n, Hkv, S, D]
        scores = torch.einsum("hmd,nhsd->nhms", qg, keys)
        out[lo : lo + slots_per_step] = (scores.amax(dim=2) * scale).float()
    return out
