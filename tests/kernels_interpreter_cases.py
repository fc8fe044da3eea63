"""Triton kernels vs float64 references, on CPU through Triton's interpreter.

Triton's interpreter works only in a process where TRITON_INTERPRET=1 was set before triton was first imported
(its library functions, tl.max and tl.sum, are decorated at that import). In a full test run something may import
triton earlier, so this file is not collected by name (no `test_` prefix): `tests/test_kernels.py` runs it in a fresh
process with the variable set. Directly: `TRITON_INTERPRET=1 python -m pytest tests/kernels_interpreter_cases.py`.

Every test draws fresh random inputs and reports its seed on failure; the outputs are poisoned with NaN before the
kernels write them, so an unwritten element fails the check. Tolerances are relative Frobenius errors against
float64: 1e-4 for float32, 1e-2 for half types. The interpreter rounds float32 -> bfloat16 toward zero (the GPU
rounds to nearest), about doubling the bf16 error here.
"""

from __future__ import annotations

import random

import pytest
import torch
from pdllm.kernels import attention, chunk_token_scores_ref, sparse_chunk_attention_ref, token_scores
from pdllm.kernels._jit import interpreter_ready

TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}


if not interpreter_ready():  # a plain run would test the GPU path or nothing: refuse rather than pass or skip
    raise RuntimeError("run with TRITON_INTERPRET=1 set before triton's import (tests/test_kernels.py does)")


@pytest.fixture
def seed():
    s = random.randrange(2**31)
    torch.manual_seed(s)
    return s


def poison_empty(monkeypatch):
    """Make torch.empty inside the kernels' launchers return NaN-filled tensors (floats) so unwritten outputs show."""
    import pdllm.kernels.chunk_scoring as cs
    import pdllm.kernels.sparse_attention as sa

    real = torch.empty

    def empty(*shape, dtype=None, device=None, **kw):
        t = real(*shape, dtype=dtype, device=device, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    for mod in (sa, cs):
        monkeypatch.setattr(mod.torch, "empty", empty)


def make_case(b, hq, hkv, tq, d, slots, s, n_max, sel_len, self_len, dtype):
    """Random inputs; sel_idx rows past sel_len hold out-of-range garbage, which must never be read."""
    q = torch.randn(b, hq, tq, d, dtype=dtype)
    k_self, v_self = torch.randn(2, b, hkv, tq, d, dtype=dtype)
    k_pool, v_pool = torch.randn(2, slots, hkv, s, d, dtype=dtype)
    sel_idx = torch.full((b, hkv, n_max), 10**9, dtype=torch.int32)
    for i, n in enumerate(sel_len):
        for h in range(hkv):  # each KV head keeps its own rows (intra-chunk token sparsity)
            sel_idx[i, h, :n] = torch.randperm(slots * s)[:n].sort().values.int()
    as_t = lambda xs: torch.tensor(xs, dtype=torch.int32)  # noqa: E731
    return q, k_self, v_self, as_t(self_len), k_pool, v_pool, sel_idx, as_t(sel_len)


def rel_err(out, ref, self_len):
    """Relative error over the valid query rows of each request (padded rows may hold anything)."""
    num = den = 0.0
    for i, n in enumerate(self_len.tolist()):
        num += (out[i, :, :n].double() - ref[i, :, :n]).pow(2).sum().item()
        den += ref[i, :, :n].pow(2).sum().item()
    return (num / max(den, 1e-300)) ** 0.5


def check_attention(case, seed, config=None, sm_scale=None):
    from pdllm.kernels.sparse_attention import sparse_chunk_attention

    q, k_self, v_self, self_len, k_pool, v_pool, sel_idx, sel_len = case
    out = sparse_chunk_attention(*case, sm_scale=sm_scale, config=config)
    ref = sparse_chunk_attention_ref(
        *(x.double() if x.is_floating_point() else x for x in case), sm_scale=sm_scale
    )  # fmt: skip
    assert out.dtype == q.dtype and out.shape == q.shape
    assert torch.isfinite(out).all(), f"unwritten or non-finite output (seed {seed})"
    err = rel_err(out, ref, self_len)
    assert err < TOL[q.dtype], f"rel err {err:.3g} >= {TOL[q.dtype]} (seed {seed}, config {config})"


def configs(*splits):
    from pdllm.kernels.sparse_attention import AttnConfig

    return [AttnConfig(block_m=16, block_n=16, num_warps=4, num_splits=n) for n in splits]


@pytest.mark.parametrize(
    "dtype,d,hq,hkv",
    [
        (torch.float32, 64, 2, 2),
        (torch.bfloat16, 64, 4, 1),
        (torch.bfloat16, 128, 7, 1),
        (torch.float16, 128, 2, 2),
        (torch.float32, 32, 8, 2),
    ],
)
def test_attention_ragged_batch(monkeypatch, seed, dtype, d, hq, hkv):
    """GQA ratios 1/4/7, D 32/64/128, ragged sel_len (one empty) and self_len, unsplit and split launches."""
    poison_empty(monkeypatch)
    case = make_case(3, hq, hkv, 8, d, slots=5, s=17, n_max=40, sel_len=[40, 0, 23], self_len=[8, 3, 6], dtype=dtype)
    for cfg in configs(1, 3):
        check_attention(case, seed, cfg)


def test_attention_one_chunk_default_config(monkeypatch, seed):
    """A single pool slot, the whole chunk selected, default launch parameters and an explicit sm_scale."""
    poison_empty(monkeypatch)
    case = make_case(1, 4, 2, 8, 64, slots=1, s=33, n_max=33, sel_len=[33], self_len=[8], dtype=torch.float32)
    check_attention(case, seed, None, sm_scale=0.05)


def test_attention_many_chunks(monkeypatch, seed):
    """Selections spread over many slots, longer than several key tiles, with many splits and a bf16 merge."""
    from pdllm.kernels.sparse_attention import AttnConfig

    poison_empty(monkeypatch)
    case = make_case(
        2, 4, 4, 16, 64, slots=24, s=9, n_max=150, sel_len=[150, 97], self_len=[16, 11], dtype=torch.bfloat16
    )
    check_attention(case, seed, AttnConfig(block_m=16, block_n=32, num_warps=4, num_splits=5))
    check_attention(case, seed, AttnConfig(block_m=16, block_n=32, num_splits=5, partial_dtype=torch.bfloat16))


def test_attention_empty_selection_and_no_keys(monkeypatch, seed):
    """sel_len 0 everywhere: the span attends to itself only; a request with no key at all gets zeros."""
    from pdllm.kernels.sparse_attention import sparse_chunk_attention

    poison_empty(monkeypatch)
    case = make_case(2, 4, 2, 8, 64, slots=2, s=9, n_max=4, sel_len=[0, 0], self_len=[8, 5], dtype=torch.float32)
    for cfg in configs(1, 4):
        check_attention(case, seed, cfg)
    q, ks, vs, self_len, kp, vp, idx, sel_len = case
    out = sparse_chunk_attention(q, ks, vs, torch.zeros_like(self_len), kp, vp, idx, sel_len, config=configs(3)[0])
    assert torch.equal(out, torch.zeros_like(out)), f"seed {seed}"


def test_attention_strided_inputs(monkeypatch, seed):
    """q/k/v as the model passes them: [B, T, H, D] projections viewed as [B, H, T, D] (non-contiguous)."""
    poison_empty(monkeypatch)
    b, hq, hkv, tq, d = 2, 4, 2, 8, 64
    q, ks, vs, self_len, kp, vp, idx, sel_len = make_case(
        b, hq, hkv, tq, d, slots=4, s=17, n_max=30, sel_len=[30, 12], self_len=[8, 8], dtype=torch.float32
    )
    q = q.transpose(1, 2).contiguous().transpose(1, 2)
    ks = ks.transpose(1, 2).contiguous().transpose(1, 2)
    vs = vs.transpose(1, 2).contiguous().transpose(1, 2)
    assert not q.is_contiguous()
    check_attention((q, ks, vs, self_len, kp, vp, idx, sel_len), seed, configs(2)[0])


def test_dispatcher(seed):
    """CPU tensors take the reference by default; 'triton' on CPU runs the interpreter; both agree."""
    case = make_case(2, 4, 2, 8, 64, slots=3, s=9, n_max=20, sel_len=[20, 7], self_len=[8, 4], dtype=torch.float32)
    ref = sparse_chunk_attention_ref(*case)
    assert torch.equal(attention(*case), ref)
    tri = attention(*case, backend="triton")
    assert rel_err(tri, ref.double(), case[3]) < 1e-4, f"seed {seed}"
    with pytest.raises(ValueError, match="backend"):
        attention(*case, backend="cuda")
    with pytest.raises(ValueError, match="sm_scale"):
        attention(*case, sm_scale=-1.0, backend="triton")


@pytest.mark.parametrize(
    "dtype,d,hq,hkv", [(torch.float32, 64, 4, 1), (torch.bfloat16, 128, 7, 1), (torch.float32, 64, 2, 2)]
)
def test_chunk_token_scores(monkeypatch, seed, dtype, d, hq, hkv):
    """Per-token max score over query tokens and the group's heads, for a subset of slots (repeats allowed)."""
    poison_empty(monkeypatch)
    tq, s = 6, 17
    q = torch.randn(hq, tq, d, dtype=dtype)
    k_pool = torch.randn(7, hkv, s, d, dtype=dtype)
    slots = torch.tensor([5, 0, 3, 5], dtype=torch.int64)
    out = token_scores(q, k_pool, slots, backend="triton")
    ref = chunk_token_scores_ref(q.double(), k_pool.double(), slots)
    assert out.dtype == torch.float32 and out.shape == (4, hkv, s)
    assert torch.isfinite(out).all(), f"seed {seed}"
    err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    assert err < 1e-5, f"rel err {err:.3g} (seed {seed})"
    assert torch.equal(token_scores(q, k_pool, slots), chunk_token_scores_ref(q, k_pool, slots))
