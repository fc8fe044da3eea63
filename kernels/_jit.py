"""Kernels are jitted on first use, not at import, for the TRITON_INTERPRET mode in force at that moment.

`triton.jit` decides between compiled and interpreted code when it decorates. Decorating at import would freeze
the choice at whichever module imported us first. Triton's own library functions (tl.max, tl.sum) are decorated when
triton.language is first imported, though, so the interpreter works only in a process that had TRITON_INTERPRET=1
set before that import: `interpreter_ready` says whether this process qualifies."""

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

        if key[1] and not interpreter_ready():
            raise RuntimeError(
                "TRITON_INTERPRET=1 was set after triton was first imported in this process: Triton's own library "
                "functions (tl.max, tl.sum, ...) are compiled-mode and the interpreter cannot call them. Set it "
                "before anything imports triton (tests/test_kernels.py runs the interpreter tests in a fresh process)."
            )

        names = fn.__code__.co_varnames[: fn.__code__.co_argcount]
        kernel = _cache[key] = triton.jit(fn, do_not_specialize=[n for n in SIZE_ARGS if n in names])
    return kernel


def interpreter_ready() -> bool:
    """Whether Triton's interpreter can run here: triton.language must have been imported in interpreter mode."""
    import sys

    if not interpreting():
        return False
    if "triton.language" not in sys.modules:
        return True
    from triton.runtime.jit import JITFunction

    return not isinstance(sys.modules["triton.language"].standard.max, JITFunction)


def dot_f32(t: Any) -> bool:
    """Whether kernels must upcast dot operands: Triton's interpreter (3.9) computes bfloat16 `tl.dot` wrongly."""
    import torch

    return interpreting() and not t.is_cuda and t.dtype == torch.bfloat16
