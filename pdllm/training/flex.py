"""Training attention that computes only the blocks the mask lets through: FlexAttention over the batch's mask.

PyTorch's memory-efficient kernel takes the boolean chunk mask as a dense bias and computes every (query, key)
block; on an H200 it is half of a training step's GPU time (benchmarks/NOTES.md, "The bundle reads multi-key
needles"). A chunked row is block-diagonal (each chunk sees only itself; only the questions and answers see every
chunk), so most of its blocks hold nothing. FlexAttention turns the same mask into a block mask and skips the empty
blocks. On a GPU it runs as one kernel compiled once for all batch shapes (torch.compile, dynamic shapes); on a CPU
it runs PyTorch's reference implementation, which the tests check against SDPA. Opt-in (`train.py --attention
flex`): on an H200 its gradients match SDPA's but its steps are not faster, 0.81-1.15x (benchmarks/NOTES.md, "Facts
asked several questions").
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from pdllm.training.objective import MaskedAttention


@functools.cache
def _kernel(device_type: str):
    """flex_attention compiled for the GPU (once per process: dynamic shapes, so new batch shapes do not recompile);
    the eager reference elsewhere."""
    return torch.compile(flex_attention, dynamic=True) if device_type == "cuda" else flex_attention


def block_mask(mask: Tensor) -> BlockMask:
    """The FlexAttention block mask of a [B, 1, T, T] boolean attention mask (query q may attend key k)."""
    dense = mask[:, 0]

    def allowed(b, h, q, k):
        return dense[b, q, k]

    t = dense.shape[-1]
    return create_block_mask(allowed, dense.shape[0], None, t, t, device=mask.device)


class FlexMaskedAttention(MaskedAttention):
    """MaskedAttention (the same mask, captures and outputs for the auxiliary losses) whose softmax attention skips
    the blocks the mask empties."""

    def __init__(self, mask: Tensor, capture: tuple[int, ...] = (), outputs: tuple[int, ...] = ()) -> None:
        super().__init__(mask, capture, outputs)
        self.blocks = block_mask(mask)

    def attention(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        kernel = _kernel(q.device.type)
        return kernel(q, k, v, block_mask=self.blocks, enable_gqa=k.shape[1] != q.shape[1])
