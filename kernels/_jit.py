"""Kernels are jitted on first use, not at import, for the TRITON_INTERPRET mode in force at that moment.

`triton.jit` decides between compiled and interpreted code when it decorates. Decorating at import would freeze
the choice at whichever module imported us first, so a test that turns the interpreter on later (in the same
pytest process) would get a compiled kernel it cannot run on CPU tensors. Keyed by mode, both coexist."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

_cache: dict[tuple[Callable[..., Any], bool], Any] = {}


def interpreting() -> bool:
    """True when Triton's CPU interpreter is requested (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def jitted(fn: Callable[..., Any]) -> Any:
    """`triton.jit(fn)` for the current interpreter mode, cached."""
    key = (fn, interpreting())
    kernel = _cache.get(key)
    if kernel is None:
        import triton

        kernel = _cache[key] = triton.jit(fn)
    return kernel


def dot_f32(t: Any) -> bool:
    """Whether kernels must upcast dot operands: Triton's interpreter (3.9) computes bfloat16 `tl.dot` wrongly."""
    import torch

    return interpreting() and not t.is_cuda and t.dtype == torch.bfloat16
