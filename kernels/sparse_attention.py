"""Decode-step attention over selected chunk KV, read where it lies in the pool (no contiguous gather first).

The span's queries (question + denoising block) attend bidirectionally to the selected pool rows of their request
(per KV head: intra-chunk token sparsity gives each head its own rows) and to the span's own keys. One program owns
a tile of query rows of one KV group (the G query heads sharing a KV head are stacked as rows, so each KV row is read
once per tile) and a contiguous share of the key sequence [selected rows ++ own keys].

At batch 1 there are too few (query tile, KV head) pairs to fill the GPU, so the key sequence is split flash-decoding
style: each split writes a normalised partial output and its log-sum-exp, and a second kernel merges the splits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._jit import dot_f32 as _dot_f32
from ._jit import jitted


def _split_kernel(
    Q, KS, VS, KP, VP, IDX, SEL_LEN, SELF_LEN, OUT, OPART, LSE,
    qk_scale,
    stride_qb, stride_qh, stride_qt,
    stride_ksb, stride_ksh, stride_kst,
    stride_vsb, stride_vsh, stride_vst,
    stride_kps, stride_kph, stride_kpt,
    stride_vps, stride_vph, stride_vpt,
    stride_ib, stride_ih,
    HQ, HKV, TQ, S, NUM_ROWS,
    HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
):  # fmt: skip
    """Grid (query tiles, B * Hkv, splits). Writes OUT directly when SPLIT is false, else OPART/LSE per split."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    num_splits = tl.num_programs(2)
    b = pid_bh // HKV
    hkv = pid_bh % HKV
    group = HQ // HKV

    # query rows of this tile: row = g * TQ + t for query head hkv * group + g
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < group * TQ
    g = rows // TQ
    t = rows - g * TQ
    hq = hkv * group + g
    d = tl.arange(0, HEAD_D)
    q = tl.load(Q + b * stride_qb + hq[:, None] * stride_qh + t[:, None] * stride_qt + d[None, :], mask=row_ok[:, None])
    if DOT_F32:
        q = q.to(tl.float32)

    # this split's share of the key sequence [selected pool rows (n_sel) ++ own keys (n_self)], whole BLOCK_N tiles
    n_sel = tl.load(SEL_LEN + b)
    n_total = n_sel + tl.load(SELF_LEN + b)
    per_split = tl.cdiv(tl.cdiv(n_total, num_splits), BLOCK_N) * BLOCK_N
    lo = pid_s * per_split
    hi = tl.minimum(lo + per_split, n_total)

    idx_base = IDX + b * stride_ib + hkv * stride_ih
    kp_base = KP + hkv * stride_kph
    vp_base = VP + hkv * stride_vph
    ks_base = KS + b * stride_ksb + hkv * stride_ksh
    vs_base = VS + b * stride_vsb + hkv * stride_vsh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        key_ok = j < hi
        in_pool = j < n_sel
        r = tl.load(idx_base + j, mask=in_pool, other=0)
        slot = (r // S).to(tl.int64)
        tok = r - (r // S) * S
        t_self = tl.maximum(j - n_sel, 0)
        # select whole row pointers (not row offsets): that keeps the 16-byte vector loads along D
        k_ptrs = tl.where(
            in_pool[:, None],
            kp_base + (slot * stride_kps + tok * stride_kpt)[:, None] + d[None, :],
            ks_base + (t_self * stride_kst)[:, None] + d[None, :],
        )
        v_ptrs = tl.where(
            in_pool[:, None],
            vp_base + (slot * stride_vps + tok * stride_vpt)[:, None] + d[None, :],
            vs_base + (t_self * stride_vst)[:, None] + d[None, :],
        )
        k = tl.load(k_ptrs, mask=key_ok[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=key_ok[:, None], other=0.0)
        if DOT_F32:  # exact stand-in for a bf16 dot (products of bf16 are exact in float32)
            k = k.to(tl.float32)

        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        qk = tl.where(key_ok[None, :], qk, float("-inf"))
        # running max in the scaled log2 domain (qk_scale > 0); the scale folds into one FMA per score below
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)  # finite: a tile starts below hi, so has a valid key
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk * qk_scale - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        p = p.to(v.dtype)
        if DOT_F32:
            p = p.to(tl.float32)
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # no key at all -> zeros
    prow = (b * HQ + hq) * TQ + t
    if SPLIT:
        prow = pid_s * NUM_ROWS + prow
        tl.store(OPART + prow[:, None] * HEAD_D + d[None, :], out.to(OPART.dtype.element_ty), mask=row_ok[:, None])
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(LSE + prow, lse, mask=row_ok)
    else:
        tl.store(OUT + prow[:, None] * HEAD_D + d[None, :], out.to(OUT.dtype.element_ty), mask=row_ok[:, None])


def _combine_kernel(OPART, LSE, OUT, NUM_ROWS, NUM_SPLITS, HEAD_D: tl.constexpr, BLOCK_R: tl.constexpr):
    """Merge the splits' normalised partials, weighted by exp2(lse_s - max lse). Grid (cdiv(rows, BLOCK_R),)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = rows < NUM_ROWS
    d = tl.arange(0, HEAD_D)
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    w_sum = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, HEAD_D], tl.float32)
    for s in range(0, NUM_SPLITS):
        prow = s * NUM_ROWS + rows
        lse = tl.load(LSE + prow, mask=ok, other=float("-inf"))
        o = tl.load(OPART + prow[:, None] * HEAD_D + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        m_new = tl.maximum(m, lse)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all splits so far empty: keep weights at 0
        alpha = tl.exp2(m - m_ref)
        w = tl.exp2(lse - m_ref)
        acc = acc * alpha[:, None] + w[:, None] * o
        w_sum = w_sum * alpha + w
        m = m_new
    out = acc / tl.where(w_sum > 0, w_sum, 1.0)[:, None]
    tl.store(OUT + rows[:, None] * HEAD_D + d[None, :], out.to(OUT.dtype.element_ty), mask=ok[:, None])


@dataclass(frozen=True)
class AttnConfig:
    """Launch parameters; `num_splits` 0 means chosen from the grid size and the SM count."""

    block_m: int = 128
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 5  # with the indirect K/V loads, Triton 3.6 overlaps the next tile with the compute from 5 on
    num_splits: int = 0
    partial_dtype: torch.dtype = torch.float32
    combine_block: int = 16


_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: a few splits, so the CPU tests exercise the merge
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def num_splits(tiles: int, slots: int, n_keys: int, block_n: int, max_splits: int = 64) -> int:
    """Fewest splits whose last wave of programs is nearly full (as FlashAttention-2 picks them: within 85% of
    the best wave efficiency), each split keeping >= 4 key tiles so partials stay small next to the KV they summarise.

    tiles: programs without splitting; slots: programs the GPU runs at once (SMs x programs per SM)."""
    most = max(1, min(max_splits, n_keys // (4 * block_n)))
    eff = [0.0]
    for s in range(1, most + 1):
        waves = tiles * s / slots
        eff.append(waves / math.ceil(waves))
    best = max(eff)
    return next(s for s in range(1, most + 1) if eff[s] >= 0.85 * best)


def default_config(q: Tensor, hkv: int, n_max: int) -> AttnConfig:
    """Heuristic launch parameters (chosen from the H100 sweep: see benchmarks/NOTES.md, section Kernels)."""
    b, hq, tq, d = q.shape
    group_rows = (hq // hkv) * tq
    if q.dtype == torch.float32:  # exact float32 dots run on FMA units: small tiles, or registers spill
        block_m, block_n = min(64, max(16, triton.next_power_of_2(group_rows))), 32
        num_warps, per_sm, stages = (16 if d >= 128 else 8), 1, 2
    else:
        # 128x64 tiles, 8 warps, 5 stages (the next K/V tile in flight over the compute) won or tied at every H100
        # shape swept; deeper pipelines (7, 9) and 128x32 / 128x128 tiles did not help (NOTES.md, Kernels)
        block_m = min(128, max(16, triton.next_power_of_2(group_rows)))
        num_warps = 8 if block_m * d >= 128 * 128 else 4
        block_n, stages = (64, 5) if d <= 128 else (32, 5)
        per_sm = 1 if num_warps == 8 else 2  # ~180-200 registers a thread: one 8-warp program per SM
    tiles = triton.cdiv(group_rows, block_m) * b * hkv
    splits = num_splits(tiles, _sm_count(q.device) * per_sm, n_max + tq, block_n)
    # normalised partials in the inputs' half type halve the merge traffic (5-15% faster in the sweep at +1e-3 error)
    partial = torch.float32 if q.dtype == torch.float32 else q.dtype
    return AttnConfig(block_m, block_n, num_warps, stages, splits, partial)


def _check(q, k_self, v_self, self_len, k_pool, v_pool, sel_idx, sel_len, sm_scale) -> None:
    b, hq, tq, d = q.shape
    hkv = k_self.shape[1]
    if k_self.shape != (b, hkv, tq, d) or v_self.shape != k_self.shape:
        raise ValueError(f"k_self/v_self must be [B, Hkv, Tq, D] = {(b, hkv, tq, d)}, got {tuple(k_self.shape)}")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    if k_pool.dim() != 4 or k_pool.shape[1] != hkv or k_pool.shape[3] != d or v_pool.shape != k_pool.shape:
        raise ValueError(f"k_pool/v_pool must be [slots, {hkv}, S, {d}], got {tuple(k_pool.shape)}")
    if sel_idx.dim() != 3 or sel_idx.shape[:2] != (b, hkv) or sel_idx.dtype != torch.int32:
        raise ValueError(f"sel_idx must be int32 [{b}, {hkv}, Nmax], got {sel_idx.dtype} {tuple(sel_idx.shape)}")
    for name, t in (("self_len", self_len), ("sel_len", sel_len)):
        if t.shape != (b,) or t.dtype != torch.int32:
            raise ValueError(f"{name} must be int32 [{b}], got {t.dtype} {tuple(t.shape)}")
    if d < 16 or d & (d - 1):
        raise ValueError(f"head dim must be a power of two >= 16, got {d}")
    if sm_scale is not None and not sm_scale > 0:
        raise ValueError(f"sm_scale must be positive, got {sm_scale}")
    if len({q.dtype, k_self.dtype, v_self.dtype, k_pool.dtype, v_pool.dtype}) != 1 or q.dtype not in _DTYPES:
        raise ValueError("q, k_self, v_self, k_pool, v_pool must share one dtype: bfloat16, float16 or float32")


def _last_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def sparse_chunk_attention(
    q: Tensor,
    k_self: Tensor,
    v_self: Tensor,
    self_len: Tensor,
    k_pool: Tensor,
    v_pool: Tensor,
    sel_idx: Tensor,
    sel_len: Tensor,
    sm_scale: float | None = None,
    config: AttnConfig | None = None,
) -> Tensor:
    """Triton path: [B, Hq, Tq, D] attention of q to the selected pool rows plus the span's own keys.

    No host synchronisation (lengths stay on the device), so it can be captured in a CUDA graph."""
    _check(q, k_self, v_self, self_len, k_pool, v_pool, sel_idx, sel_len, sm_scale)
    q, k_self, v_self, k_pool, v_pool = map(_last_contiguous, (q, k_self, v_self, k_pool, v_pool))
    sel_idx = sel_idx if sel_idx.stride(-1) == 1 else sel_idx.contiguous()
    b, hq, tq, d = q.shape
    hkv = k_self.shape[1]
    cfg = config or default_config(q, hkv, sel_idx.shape[-1])
    if cfg.num_splits == 0:
        auto = default_config(q, hkv, sel_idx.shape[-1])
        cfg = AttnConfig(**{**cfg.__dict__, "num_splits": auto.num_splits})
    scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    out = torch.empty(b, hq, tq, d, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    num_rows = b * hq * tq
    split = cfg.num_splits > 1
    if split:
        opart = torch.empty(cfg.num_splits, num_rows, d, dtype=cfg.partial_dtype, device=q.device)
        lse = torch.empty(cfg.num_splits, num_rows, dtype=torch.float32, device=q.device)
    else:
        opart = lse = out  # unused
    grid = (triton.cdiv((hq // hkv) * tq, cfg.block_m), b * hkv, cfg.num_splits)
    jitted(_split_kernel)[grid](
        q, k_self, v_self, k_pool, v_pool, sel_idx, sel_len, self_len, out, opart, lse,
        scale * 1.4426950408889634,
        q.stride(0), q.stride(1), q.stride(2),
        k_self.stride(0), k_self.stride(1), k_self.stride(2),
        v_self.stride(0), v_self.stride(1), v_self.stride(2),
        k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        v_pool.stride(0), v_pool.stride(1), v_pool.stride(2),
        sel_idx.stride(0), sel_idx.stride(1),
        hq, hkv, tq, k_pool.shape[2], num_rows,
        HEAD_D=d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, SPLIT=split,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", DOT_F32=_dot_f32(q),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if split:
        grid = (triton.cdiv(num_rows, cfg.combine_block),)
        jitted(_combine_kernel)[grid](
            opart, lse, out, num_rows, cfg.num_splits, HEAD_D=d, BLOCK_R=cfg.combine_block, num_warps=4
        )
    return out
