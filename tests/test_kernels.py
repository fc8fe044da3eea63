"""Kernel tests that need no interpreter (references, dispatch), plus the Triton interpreter tests run in a fresh
process: the interpreter must be switched on before triton is first imported, which a shared pytest process cannot
promise (see tests/kernels_interpreter_cases.py)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pdllm.kernels import attention, gather_selected, pick_backend, sparse_chunk_attention_ref

HERE = Path(__file__).resolve().parent


@pytest.fixture
def seed():
    s = random.randrange(2**31)
    torch.manual_seed(s)
    return s


def make_case(b, hq, hkv, tq, d, slots, s, n, dtype=torch.float64):
    q = torch.randn(b, hq, tq, d, dtype=dtype)
    k_self, v_self = torch.randn(2, b, hkv, tq, d, dtype=dtype)
    k_pool, v_pool = torch.randn(2, slots, hkv, s, d, dtype=dtype)
    sel_idx = torch.stack([torch.randperm(slots * s)[:n] for _ in range(b * hkv)]).view(b, hkv, n).int()
    full = lambda v: torch.full((b,), v, dtype=torch.int32)  # noqa: E731
    return q, k_self, v_self, full(tq), k_pool, v_pool, sel_idx, full(n)


def test_triton_kernels_in_interpreter():
    """Runs tests/kernels_interpreter_cases.py in a fresh Python with TRITON_INTERPRET=1 (CPU, ~15 s)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / "kernels_interpreter_cases.py")]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=280)
    tail = (res.stdout + res.stderr)[-6000:]
    assert res.returncode == 0, tail
    assert " passed" in tail and "skipped" not in tail, tail


def test_reference_matches_dense_sdpa(seed):
    """The reference itself: equal to SDPA over the gathered, concatenated keys when nothing is masked."""
    hq, hkv = 8, 2
    case = make_case(2, hq, hkv, 8, 32, slots=4, s=9, n=20)
    q, ks, vs, _, kp, vp, idx, sel_len = case
    keys = torch.cat([gather_selected(kp, idx, sel_len), ks], dim=2).repeat_interleave(hq // hkv, dim=1)
    vals = torch.cat([gather_selected(vp, idx, sel_len), vs], dim=2).repeat_interleave(hq // hkv, dim=1)
    dense = torch.nn.functional.scaled_dot_product_attention(q, keys, vals)
    torch.testing.assert_close(sparse_chunk_attention_ref(*case), dense, msg=f"seed {seed}")


def test_reference_masks_and_empty_rows(seed):
    """Masked selection entries are never read (garbage indices), and a request with no keys gets zeros."""
    case = list(make_case(2, 4, 2, 6, 16, slots=3, s=5, n=7))
    case[6][1, :, 3:] = 10**9  # request 1 uses only 3 entries; the rest are out of range
    case[7] = torch.tensor([7, 3], dtype=torch.int32)
    out = sparse_chunk_attention_ref(*case)
    trimmed = [x if i in (4, 5) else x[1:] for i, x in enumerate(case)]  # batch tensors only, not the pools
    trimmed[6] = trimmed[6][..., :3]
    torch.testing.assert_close(out[1:], sparse_chunk_attention_ref(*trimmed), msg=f"seed {seed}")
    case[3] = torch.zeros(2, dtype=torch.int32)
    case[7] = torch.zeros(2, dtype=torch.int32)
    assert torch.equal(sparse_chunk_attention_ref(*case), torch.zeros_like(case[0]))


def test_dispatch_defaults_to_reference_on_cpu():
    case = make_case(1, 2, 2, 4, 16, slots=2, s=5, n=6, dtype=torch.float32)
    assert torch.equal(attention(*case), sparse_chunk_attention_ref(*case))
    assert pick_backend(True, None) == "triton" and pick_backend(False, None) == "torch"
    with pytest.raises(ValueError, match="backend"):
        pick_backend(False, "cuda")
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        with pytest.raises(ValueError, match="TRITON_INTERPRET"):
            attention(*case, backend="triton")
