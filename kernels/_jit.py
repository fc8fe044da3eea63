"""Kernels are jitted on first use, not at import, for the TRITON_INTERPRET mode in force at that moment.

`triton.jit` decides between compiled and interpreted code when it decorates. Decorating at import would freeze
the choice at whichever module imported us first, so a test that turns the interpreter on later (in the same
pytest process) would get a compiled kernel it cannot run on CPU tensors. Keyed by mode, both coexist."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

_cache: dict[tuple[Callable[..., Any], bool], Any] = {}

# integer arguments that carry sizes, not strides: specialising on them (== 1, divisible by 16) would compile one
# variant per model shape for no gain, while strides keep their divisibility hints (16-byte vector loads need them)
SIZE_ARGS = ("HQ", "HKV", "TQ", "S", "NUM_ROWS", "NUM_SPLITS")


def interpreting() -> bool:
    """True when Triton's CPU interpreter is requested (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def jitted(fn: Callable[..., Any]) -> Any:
    """`triton.jit(fn)` for the current interpreter mode, cached."""
    key = (fn, interpreting())
    kernel = _cache.get(key)
    if kernel is None:
        import triton

        names = fn.__code__.co_varnames[: fn.__code__.co_argcount]
        kernel = _cache[key] = triton.jit(fn, do_not_specialize=[n for n in SIZE_ARGS if n in names])
    return kernel


def dot_f32(t: Any) -> bool:
    """Whether kernels must upcast dot operands: Triton's interpreter (3.9) computes bfloat16 `tl.dot` wrongly."""
    import torch

    return interpreting() and not t.is_cuda and t.dtype == torch.bfloat16
