"""Per-token relevance of candidate chunks to the question: max over query tokens and the KV group's query heads of
q.k * scale, read straight from the chunk pool. The caller pools it into a chunk score (top-K) and keeps the best
tokens inside kept chunks (token sparsity); keeping the max per token lets it choose the pooling."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._jit import dot_f32, jitted


def _scores_kernel(
    Q, KP, SLOTS, OUT,
    scale,
    stride_qh, stride_qt,
    stride_kps, stride_kph, stride_kpt,
    HQ, HKV, TQ, S,
    HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, PRECISION: tl.constexpr,
    DOT_F32: tl.constexpr,
):  # fmt: skip
    """Grid (N * Hkv, cdiv(S, BLOCK_S)): one tile of one chunk's tokens for one KV head, all its query rows."""
    pid_nh = tl.program_id(0)
    n = pid_nh // HKV
    h = pid_nh % HKV
    group = HQ // HKV
    toks = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    tok_ok = toks < S
    d = tl.arange(0, HEAD_D)
    slot = tl.load(SLOTS + n).to(tl.int64)
    k = tl.load(KP + slot * stride_kps + h * stride_kph + toks[:, None] * stride_kpt + d[None, :], mask=tok_ok[:, None])
    if DOT_F32:  # exact stand-in for a bf16 dot in the interpreter
        k = k.to(tl.float32)
    best = tl.full([BLOCK_S], float("-inf"), tl.float32)
    for m0 in range(0, group * TQ, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        ok = rows < group * TQ
        g = rows // TQ
        t = rows - g * TQ
        q = tl.load(Q + (h * group + g)[:, None] * stride_qh + t[:, None] * stride_qt + d[None, :], mask=ok[:, None])
        if DOT_F32:
            q = q.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        s = tl.where(ok[:, None], s, float("-inf"))
        best = tl.maximum(best, tl.max(s, 0))
    tl.store(OUT + pid_nh * S + toks, best * scale, mask=tok_ok)


def chunk_token_scores(q: Tensor, k_pool: Tensor, slots: Tensor, sm_scale: float | None = None) -> Tensor:
    """Triton path. q [Hq, Tq, D]; k_pool [slots, Hkv, S, D]; slots [N] int -> [N, Hkv, S] float32."""
    hq, tq, d = q.shape
    _, hkv, s, _ = k_pool.shape
    if hq % hkv or k_pool.shape[3] != d or q.dtype != k_pool.dtype:
        raise ValueError(f"q {tuple(q.shape)} {q.dtype} does not match k_pool {tuple(k_pool.shape)} {k_pool.dtype}")
    if d < 16 or d & (d - 1):
        raise ValueError(f"head dim must be a power of two >= 16, got {d}")
    scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    if scale <= 0:
        raise ValueError("sm_scale must be positive (the max is taken before scaling)")
    q = q if q.stride(-1) == 1 else q.contiguous()
    k_pool = k_pool if k_pool.stride(-1) == 1 else k_pool.contiguous()
    slots = slots.contiguous()
    out = torch.empty(slots.numel(), hkv, s, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    block_m = min(64, max(16, triton.next_power_of_2((hq // hkv) * tq)))
    block_s = 64
    grid = (slots.numel() * hkv, triton.cdiv(s, block_s))
    jitted(_scores_kernel)[grid](
        q, k_pool, slots, out, scale,
        q.stride(0), q.stride(1),
        k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        hq, hkv, tq, s,
        HEAD_D=d, BLOCK_M=block_m, BLOCK_S=block_s,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", DOT_F32=dot_f32(q),
        num_warps=4, num_stages=2,
    )  # fmt: skip
    return out
