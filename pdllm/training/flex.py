"""Training attention that computes only the blocks the chunk layout lets through: FlexAttention over the segments.

PyTorch's memory-efficient kernel takes the boolean chunk mask as a dense bias and computes every (query, key)
block; on an H200 it is half of a training step's GPU time (benchmarks/NOTES.md, "The bundle reads multi-key
needles"). A chunked row is block-diagonal (each chunk sees only itself; only the questions and answers see every
chunk), so most of its blocks hold nothing. FlexAttention skips the empty blocks. Its mask is a rule over the
batch's segment ids (`allowed`, data.attention_mask's rule), not a dense [B, T, T] tensor: the block mask is built
by evaluating the rule (compiled on the GPU), and where a block is partly masked the kernel reads two segment ids
instead of the dense mask (a first version closed over the dense mask and was no faster than SDPA). On a GPU
it runs as one kernel compiled once for all batch shapes (torch.compile, dynamic shapes); on a CPU it runs PyTorch's
reference implementation, which the tests check against SDPA. On an H100 a recall-stage step takes 66.5 ms against
SDPA's 82.0 (benchmarks/NOTES.md, "Faster training steps, prefill by length, broader wordings"), and 44.7 ms against
81.0 with all layers one compiled region (train.py --compile; training.stack calls flex_attention inside that
region). Opt-in (`--attention flex`); benchmarks/reproduce_bundle.sh runs its chain with it.
"""

from __future__ import annotations

import functools
import json
import typing

import torch
from torch import Tensor
from torch.nn.attention import flex_attention as _flex_module
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from pdllm.training.data import PAD_SEGMENT, QUERY_SEGMENT, attention_mask
from pdllm.training.objective import MaskedAttention


def block_attention(q: Tensor, k: Tensor, v: Tensor, blocks: BlockMask, options: dict | None = None) -> Tensor:
    """FlexAttention under a block mask (GQA when k has fewer heads than q); what _kernel compiles, and what
    training.stack calls inside its own compiled region. `options`: FlexAttention's kernel options (block sizes,
    warps, stages; train.py --flex-options), None for its defaults."""
    return flex_attention(q, k, v, block_mask=blocks, enable_gqa=k.shape[1] != q.shape[1], kernel_options=options)


def kernel_options(text: str) -> dict:
    """train.py --flex-options: a JSON object of FlexAttention kernel options, each name checked against PyTorch's
    list (an optional fwd_ or bwd_ prefix for one pass), since FlexAttention ignores a misspelt one silently. The
    bundle's heads are 32 wide, for which the default block sizes are not tuned (benchmarks/NOTES.md, "The 64K step
    timed")."""
    try:
        options = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(options, dict):
        raise ValueError(f"a JSON object of option names and values, not {type(options).__name__}")
    known = getattr(_flex_module, "FlexKernelOptions", None)  # not in every PyTorch: then the names go unchecked
    names = set(typing.get_type_hints(known)) if known is not None else None
    for name, value in options.items():
        base = name.removeprefix("fwd_").removeprefix("bwd_")
        if names is not None and base not in names:
            raise ValueError(f"unknown FlexAttention kernel option {name!r}; known: {', '.join(sorted(names))}")
        if not isinstance(value, (bool, int, str)):
            raise ValueError(f"option {name!r}: a number, true/false or a string, not {value!r}")
    return options


@functools.cache
def _kernel(device_type: str):
    """block_attention compiled for the GPU (once per process: dynamic shapes, so new batch shapes do not
    recompile); the eager reference elsewhere."""
    return torch.compile(block_attention, dynamic=True) if device_type == "cuda" else block_attention


def allowed(seg: Tensor, full: Tensor):
    """The mask rule of data.attention_mask as a FlexAttention mask_mod: may query q of row b see key k."""

    def rule(b, h, q, k):
        sq, sk = seg[b, q], seg[b, k]
        asking = (sq == QUERY_SEGMENT) | (sq < PAD_SEGMENT)  # a question or answer sees the whole context
        sees = (sq == sk) | (asking & (sk >= 0)) | full[b]
        return (sees & (sk != PAD_SEGMENT)) | ((sq == PAD_SEGMENT) & (q == k))  # padding: itself, one block

    return rule


def block_mask(seg: Tensor, full: Tensor) -> BlockMask:
    """The FlexAttention block mask of a batch's layout (segment ids [B, T], dense-context rows `full` [B])."""
    b, t = seg.shape
    return create_block_mask(allowed(seg, full), b, None, t, t, device=seg.device, _compile=seg.is_cuda)


class FlexMaskedAttention(MaskedAttention):
    """MaskedAttention (the same captures and outputs for the auxiliary losses) whose softmax attention skips the
    blocks the layout empties. The dense mask is built only when an auxiliary loss reads it."""

    def __init__(
        self, seg: Tensor, full: Tensor, capture: tuple[int, ...] = (), outputs: tuple[int, ...] = (),
        tokens: Tensor | None = None,
    ):  # fmt: skip
        self.seg, self.full, self.capture, self.outputs, self.tokens = seg, full, capture, outputs, tokens
        self.qk, self.head0 = {}, {}
        self.blocks = block_mask(seg, full)

    @classmethod
    def of_batch(
        cls, seg: Tensor, full: Tensor, capture: tuple[int, ...] = (), outputs: tuple[int, ...] = (),
        tokens: Tensor | None = None,
    ):  # fmt: skip
        return cls(seg, full, capture, outputs, tokens)

    @functools.cached_property
    def mask(self) -> Tensor:  # type: ignore[override]  # MaskedAttention's attribute, built on first read
        return attention_mask(self.seg, self.full)

    def attention(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return _kernel(q.device.type)(q, k, v, self.blocks)
