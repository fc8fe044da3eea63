"""A training step's layers as one compiled graph (train.py --compile stack).

With each layer's projections and MLP compiled on their own (train.py --compile blocks) a step on an H100 is paced by
the host, not the GPU: 49-53 ms of wall against 27-33 ms of GPU work, most of the host's time spent entering and
leaving about a hundred compiled regions a step (three a layer, forward and backward, for the batch and again for
the questions the ranking loss reads; benchmarks/NOTES.md, "Training steps as one graph"). Here all layers of a
forward, attention included (FlexAttention over the block mask, or SDPA under a dense mask), are one region: on an
H100 the step is 1.11-1.20x faster than with compiled blocks and 1.8x faster than eager SDPA, same batches.

The attention contexts of the training loss keep what the auxiliary losses read (queries and keys of a layer, head
0's output) by writing to themselves as the layers run. A side effect inside a compiled region is what whole-model
compilation lost (seen on torch 2.13), so the compiled function has none: it returns every layer's queries, keys,
values and head-0 output, always the same outputs (one graph, whatever the batch's auxiliary losses need), and the
context keeps its share of them after the region returns. Contexts this module does not know run the plain loop.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from pdllm.method.selection import PaddedQueryCapture
from pdllm.models.attention import AttentionContext
from pdllm.models.transformer import Block, DllmModel
from pdllm.training.flex import FlexMaskedAttention, block_attention
from pdllm.training.objective import MaskedAttention, masked_attention

LayerOutputs = tuple[Tensor, list[Tensor], list[Tensor], list[Tensor], list[Tensor]]


def _layers(layers, attend, x: Tensor, cos: Tensor, sin: Tensor, mask, tokens: Tensor | None) -> LayerOutputs:
    """Every layer over x [B, T, hidden]. With `tokens` (the flat positions row * T + t that are not padding; train.py
    --pack-tokens) the per-token parts (norms, projections, MLP) run on those tokens alone, [N, hidden]: padding is
    15-31% of a 64K-token batch's positions, which the projections and MLP would multiply for nothing. Attention,
    and every output, keep the padded [B, ., T, .] layout (zeros where padding is). Opt-in: on an H100 it took 1% off
    the 64K recall step's GPU time, where attention is half of it (benchmarks/NOTES.md, "The 64K step timed")."""
    b, t, _ = x.shape
    if tokens is not None:
        x = x.flatten(0, 1).index_select(0, tokens)
    qs, ks, vs, heads = [], [], [], []
    for layer in layers:
        if tokens is None:
            q, k, v = Block.project(layer, x, cos, sin)
        else:
            q, k, v = Block.heads(layer, *(_padded(p, tokens, b, t) for p in Block.project_tokens(layer, x)), cos, sin)
        out = attend(q, k, v, mask)
        if tokens is None:
            x = Block.finish(layer, x, out)
        else:
            x = Block.finish_tokens(layer, x, out.transpose(1, 2).flatten(0, 1).flatten(1).index_select(0, tokens))
        qs.append(q)
        ks.append(k)
        vs.append(v)
        heads.append(out[:, 0])
    return (x if tokens is None else _padded(x, tokens, b, t)), qs, ks, vs, heads


def _padded(rows: Tensor, tokens: Tensor, b: int, t: int) -> Tensor:
    """[B, T, C]: `rows` [N, C] at the flat positions `tokens`, zeros elsewhere (index_copy: its gradient is a
    gather, no atomic adds)."""
    return rows.new_zeros(b * t, rows.shape[-1]).index_copy(0, tokens, rows).view(b, t, -1)


def _dense_stack(layers) -> Callable[..., LayerOutputs]:
    def dense_layers(x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, tokens: Tensor | None) -> LayerOutputs:
        return _layers(layers, masked_attention, x, cos, sin, mask, tokens)

    return dense_layers


def _flex_stack(layers, options: dict | None) -> Callable[..., LayerOutputs]:
    # its own code object, so its compiled graphs (a BlockMask input) and the dense ones (a mask tensor) are kept
    # apart: dynamo caches graphs per code object, and one shared cache recompiled at every switch of input type
    def attend(q: Tensor, k: Tensor, v: Tensor, blocks) -> Tensor:
        return block_attention(q, k, v, blocks, options)

    def flex_layers(x: Tensor, cos: Tensor, sin: Tensor, mask, tokens: Tensor | None) -> LayerOutputs:
        return _layers(layers, attend, x, cos, sin, mask, tokens)

    return flex_layers


class CompiledStack:
    """`DllmModel.run_layers` for training: one compiled region per forward for the contexts the loss uses
    (MaskedAttention, FlexMaskedAttention, PaddedQueryCapture), the model's own loop for any other. Shapes are
    dynamic from the first batch: the curriculum's batches come in hundreds of shapes."""

    def __init__(
        self, model: DllmModel, backend: str = "inductor", pack: bool = False, flex_options: dict | None = None
    ) -> None:
        self.plain = DllmModel.run_layers.__get__(model)
        self.pack = pack  # per-token parts on the batch's tokens alone (False: on every position, padding too)
        self.dense = torch.compile(_dense_stack(model.layers), backend=backend, dynamic=True)
        self.flex = torch.compile(_flex_stack(model.layers, flex_options), backend=backend, dynamic=True)

    def __call__(
        self, x: Tensor, cos: Tensor, sin: Tensor, context: AttentionContext, return_kv: bool
    ) -> tuple[Tensor, list[tuple[Tensor, Tensor]] | None]:
        tokens = getattr(context, "tokens", None) if self.pack else None
        if tokens is not None:  # read on the CPU copy of the batch (BatchLayout.tokens): the copy waits on nothing
            tokens = tokens.to(x.device, non_blocking=True)
        if isinstance(context, FlexMaskedAttention):
            x, qs, ks, vs, heads = self.flex(x, cos, sin, context.blocks, tokens)
        elif isinstance(context, MaskedAttention):
            x, qs, ks, vs, heads = self.dense(x, cos, sin, context.mask, tokens)
        elif isinstance(context, PaddedQueryCapture) and context.valid is not None:
            x, qs, ks, vs, heads = self.dense(x, cos, sin, context.valid[:, None, None, :], None)
        else:
            return self.plain(x, cos, sin, context, return_kv)
        if isinstance(context, MaskedAttention):
            context.qk.update({i: (qs[i], ks[i]) for i in context.capture})
            context.head0.update({i: heads[i] for i in context.outputs})
        else:
            context.q.update({i: qs[i] for i in context.layers})
        return x, list(zip(ks, vs, strict=True)) if return_kv else None


def compile_stack(
    model: DllmModel, backend: str = "inductor", pack: bool = False, flex_options: dict | None = None
) -> None:
    """Run the training forwards of `model` as one compiled region each (CompiledStack; `pack`: its per-token parts
    on the batch's tokens alone; `flex_options`: FlexAttention's kernel options). The model's parameters and state
    dict are unchanged: checkpoints and exports read the same."""
    model.run_layers = CompiledStack(model, backend, pack, flex_options)
