"""One batched denoising step on the device: every running job's span through the model at once.

The batch lives in static buffers sized for the largest batch (`BatchBuffers`); a step runs over views of their
leading rows and columns, so a CUDA graph captured for a (batch, span, rows, selected, writes) bucket replays with
whatever the buffers hold now. Per job: its span (question tokens still run + every generated token) at its own
positions, its own selected pool rows (per layer and KV head) read through the sparse kernel, the rows of its
current block whose logits are wanted, and, on a job's first step when its question KV is kept, the rows to copy
into its pool pages. The step ends with the greedy choice and its confidence per block row; nothing in it waits on
the host. On CPU the same code runs eagerly over exactly sized views.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from pdllm.decode_node.kv_pool import TRASH_PAGE, KVPool
from pdllm.kernels import attention
from torch import Tensor

from pdllm.models.transformer import DllmModel

log = logging.getLogger(__name__)
DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
SPAN_ALIGN, ROWS_ALIGN, WRITES_ALIGN = 32, 256, 64  # graph bucket granularity of span, selected rows, KV writes


@dataclass(frozen=True)
class StepShape:
    batch: int  # rows of the batch (jobs, padded up to a bucket on CUDA)
    span: int  # tokens per row
    block: int  # logit rows per job
    selected: int  # selected pool rows per job and head
    writes: int  # question-KV rows written into the pool this step (0: none)


class BatchBuffers:
    """Device tensors of the batch, at their largest sizes; row b belongs to one running job."""

    def __init__(
        self, model: DllmModel, max_batch: int, max_span: int, max_block: int, max_selected: int, max_writes: int
    ) -> None:
        dev, spec = model.device, model.spec
        self.max_batch, self.max_span, self.max_block = max_batch, max_span, max_block
        self.max_selected, self.max_writes = max_selected, max_writes
        self.ids = torch.zeros(max_batch, max_span + 1, dtype=torch.long, device=dev)  # last column: scratch
        self.pos = torch.zeros(max_batch, max_span, dtype=torch.long, device=dev)
        self.self_len = torch.zeros(max_batch, dtype=torch.int32, device=dev)
        self.sel = torch.zeros(
            spec.num_layers, max_batch, spec.num_kv_heads, max_selected, dtype=torch.int32, device=dev
        )
        self.sel_len = torch.zeros(max_batch, dtype=torch.int32, device=dev)
        self.logit_rows = torch.zeros(max_batch, max_block, dtype=torch.long, device=dev)
        self.tok_rows = torch.full((max_batch, max_block), max_span, dtype=torch.long, device=dev)
        self.write_b = torch.zeros(max_writes, dtype=torch.long, device=dev)
        self.write_t = torch.zeros(max_writes, dtype=torch.long, device=dev)
        self.write_page = torch.full((max_writes,), TRASH_PAGE, dtype=torch.long, device=dev)
        self.write_row = torch.zeros(max_writes, dtype=torch.long, device=dev)


class BatchAttention:
    """AttentionContext of a batched step: each row attends to its selected pool rows and its own span keys; on a
    step with writes, the listed span rows' K/V are first stored in the pool (a kept question's KV)."""

    def __init__(self, pool: KVPool, buf: BatchBuffers, shape: StepShape) -> None:
        b, n, w = shape.batch, shape.selected, shape.writes
        self.pool = pool
        self.sel = buf.sel[:, :b, :, :n]
        self.sel_len, self.self_len = buf.sel_len[:b], buf.self_len[:b]
        self.writes = (buf.write_b[:w], buf.write_t[:w], buf.write_page[:w], buf.write_row[:w]) if w else None

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        kp, vp = self.pool.k[layer], self.pool.v[layer]
        if self.writes is not None:
            wb, wt, page, row = self.writes
            kp[page, :, row] = k[wb, :, wt]
            vp[page, :, row] = v[wb, :, wt]
        return attention(q, k, v, self.self_len, kp, vp, self.sel[layer], self.sel_len)


def greedy_choice(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Argmax token and its softmax probability (the low-confidence remasking score) per row: [B, R] each."""
    chosen = logits.argmax(-1)
    conf = torch.softmax(logits, dim=-1).gather(-1, chosen[..., None]).squeeze(-1)
    return chosen, conf


class StepRunner:
    """Runs the batched forward for a StepShape: eagerly, or by replaying a CUDA graph captured per bucket."""

    def __init__(
        self,
        model: DllmModel,
        pool: KVPool,
        buf: BatchBuffers,
        buckets: tuple[int, ...] = DEFAULT_BUCKETS,
        use_graphs: bool | None = None,
        max_graphs: int = 32,
    ) -> None:
        self.model, self.pool, self.buf = model, pool, buf
        self.buckets = tuple(sorted(b for b in buckets if b <= buf.max_batch)) or (buf.max_batch,)
        self.use_graphs = model.device.type == "cuda" if use_graphs is None else use_graphs
        self.max_graphs = max_graphs
        self.graphs: dict[StepShape, tuple[torch.cuda.CUDAGraph, tuple[Tensor, Tensor, Tensor]]] = {}
        self.graph_pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self.captures = 0
        self.replays = 0

    def shape(self, batch: int, span: int, block: int, selected: int, writes: int) -> StepShape:
        """The shape a step runs at: exact when eager; rounded up to a bucket when graphed (fewer captures)."""
        if not self.use_graphs:
            return StepShape(batch, span, block, max(1, selected), writes)
        b = next((x for x in self.buckets if x >= batch), self.buf.max_batch)
        buf = self.buf
        return StepShape(
            b,
            min(buf.max_span, _round_up(span, SPAN_ALIGN)),
            block,
            min(buf.max_selected, _round_up(max(1, selected), ROWS_ALIGN)),
            0 if writes == 0 else min(buf.max_writes, _round_up(writes, WRITES_ALIGN)),
        )

    @torch.no_grad()
    def forward(self, shape: StepShape) -> tuple[Tensor, Tensor, Tensor]:
        """(logits [B, R, V] float32, chosen [B, R], confidence [B, R]) for the current buffers."""
        if not self.use_graphs:
            return self._eager(shape)
        entry = self.graphs.get(shape)
        if entry is None:
            entry = self._capture(shape)
        self.replays += 1
        entry[0].replay()
        return entry[1]

    def _eager(self, shape: StepShape) -> tuple[Tensor, Tensor, Tensor]:
        b, t, r = shape.batch, shape.span, shape.block
        out = self.model(
            self.buf.ids[:b, :t],
            position_ids=self.buf.pos[:b, :t],
            context=BatchAttention(self.pool, self.buf, shape),
            logits_rows=self.buf.logit_rows[:b, :r],
        )
        chosen, conf = greedy_choice(out.logits)
        return out.logits, chosen, conf

    def _capture(self, shape: StepShape):
        if len(self.graphs) >= self.max_graphs:  # oldest first: shapes of a past workload
            self.graphs.pop(next(iter(self.graphs)))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # compile the kernels and settle the allocator outside the capture
                self._eager(shape)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.graph_pool, capture_error_mode="thread_local"):
            outputs = self._eager(shape)
        self.graphs[shape] = (graph, outputs)
        self.captures += 1
        log.debug("captured a decode step graph for %s", shape)
        return self.graphs[shape]


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m
