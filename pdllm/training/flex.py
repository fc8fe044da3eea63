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

import dataclasses
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


MASK_BLOCK = 128  # FlexAttention's default tile of the block mask, in tokens (its kernel's blocks divide it)
_KERNEL_BLOCKS = ("BLOCK_M", "BLOCK_N", "BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2")


@dataclasses.dataclass(frozen=True)
class FlexTuning:
    """How the training FlexAttention runs, not what it computes (train.py --flex-options): the block mask's tile in
    tokens, and FlexAttention's kernel options (block sizes, warps, stages). A smaller tile skips more of a chunked
    row's masked area; the kernel's blocks must divide it (benchmarks/NOTES.md, "FlexAttention tuned for 32-wide
    heads")."""

    mask_block: int = MASK_BLOCK
    kernel: dict = dataclasses.field(default_factory=dict)

    def as_json(self) -> str:
        """The --flex-options text that gives this tuning (compact: a benchmark's row label)."""
        tile = {"MASK_BLOCK_SIZE": self.mask_block} if self.mask_block != MASK_BLOCK else {}
        return json.dumps(tile | self.kernel, separators=(",", ":"))


def flex_tuning(text: str) -> FlexTuning:
    """train.py --flex-options: a JSON object of FlexAttention kernel options, each name checked against PyTorch's
    list (an optional fwd_ or bwd_ prefix for one pass), since FlexAttention ignores a misspelt one silently, plus
    MASK_BLOCK_SIZE, the block mask's tile (a power of two from 16; each kernel block size given must divide it)."""
    try:
        options = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(options, dict):
        raise ValueError(f"a JSON object of option names and values, not {type(options).__name__}")
    mask_block = options.pop("MASK_BLOCK_SIZE", MASK_BLOCK)
    if type(mask_block) is not int or mask_block < 16 or mask_block & (mask_block - 1):
        raise ValueError(f"MASK_BLOCK_SIZE {mask_block!r}: a power of two from 16 (tokens a tile of the block mask)")
    known = getattr(_flex_module, "FlexKernelOptions", None)  # not in every PyTorch: then the names go unchecked
    names = set(typing.get_type_hints(known)) if known is not None else None
    for name, value in options.items():
        base = name.removeprefix("fwd_").removeprefix("bwd_")
        if names is not None and base not in names:
            raise ValueError(f"unknown FlexAttention kernel option {name!r}; known: {', '.join(sorted(names))}")
        if not isinstance(value, (bool, int, str)):
            raise ValueError(f"option {name!r}: a number, true/false or a string, not {value!r}")
        if base in _KERNEL_BLOCKS and (type(value) is not int or value < 1 or mask_block % value):
            raise ValueError(f"option {name!r} {value!r} does not divide the mask's tile ({mask_block} tokens): "
                             "the kernel's blocks tile the block mask's")  # fmt: skip
    return FlexTuning(mask_block, options)


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


def block_mask(seg: Tensor, full: Tensor, tile: int = MASK_BLOCK) -> BlockMask:
    """The FlexAttention block mask of a batch's layout (segment ids [B, T], dense-context rows `full` [B]), in
    tiles of `tile` tokens."""
    b, t = seg.shape
    rule = allowed(seg, full)
    return create_block_mask(rule, b, None, t, t, device=seg.device, BLOCK_SIZE=tile, _compile=seg.is_cuda)


class FlexMaskedAttention(MaskedAttention):
    """MaskedAttention (the same captures and outputs for the auxiliary losses) whose softmax attention skips the
    blocks the layout empties. The dense mask is built only when an auxiliary loss reads it."""

    mask_block = MASK_BLOCK  # the block mask's tile in tokens (with_mask_block)

    def __init__(
        self, seg: Tensor, full: Tensor, capture: tuple[int, ...] = (), outputs: tuple[int, ...] = (),
        tokens: Tensor | None = None,
    ):  # fmt: skip
        self.seg, self.full, self.capture, self.outputs, self.tokens = seg, full, capture, outputs, tokens
        self.qk, self.head0 = {}, {}
        self.blocks = block_mask(seg, full, self.mask_block)

    @classmethod
    def of_batch(
        cls, seg: Tensor, full: Tensor, capture: tuple[int, ...] = (), outputs: tuple[int, ...] = (),
        tokens: Tensor | None = None,
    ):  # fmt: skip
        return cls(seg, full, capture, outputs, tokens)

    @classmethod
    @functools.cache
    def with_mask_block(cls, tile: int) -> type[FlexMaskedAttention]:
        """This attention with its block mask in tiles of `tile` tokens (FlexTuning.mask_block): one class per tile,
        so the compiled stack sees the same class each step."""
        return cls if tile == cls.mask_block else type(f"{cls.__name__}{tile}", (cls,), {"mask_block": tile})

    @functools.cached_property
    def mask(self) -> Tensor:  # type: ignore[override]  # MaskedAttention's attribute, built on first read
        return attention_mask(self.seg, self.full)

    def attention(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return _kernel(q.device.type)(q, k, v, self.blocks)
