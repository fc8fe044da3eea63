"""A training batch's tensors in one byte buffer, for the trip from a DataLoader worker to the GPU.

A Batch is fifteen tensors. A worker hands each to the main process as its own shared-memory file (one file
descriptor passed, mapped and later unmapped per tensor), the pin thread pins each, and each is copied to the GPU
on its own: about 10 ms a 64K-token batch on the main process's side on a 2-core host, against 2 ms for one buffer.
Packed, the batch is one file, one pinned buffer and one copy, and the fields come back as views of it, on either
side of the copy. Opt-in (train.py --packed-batches): on one H100 the loop with it ran at 79.5 ms a step against
57.0 over pre-made batches, where the plain loop had run at 66.0 against 59.5 on another H100 (benchmarks/NOTES.md,
"The kv slip is the layout"); not yet compared on one machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from pdllm.training.data import Batch

ALIGN = 8  # every field starts at a multiple of the widest dtype's size, so a byte slice views as that dtype


@dataclass(frozen=True)
class FieldSpan:
    """Where one Batch field lies in the buffer: its first byte, dtype and shape."""

    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass
class PackedBatch:
    """A Batch as one uint8 buffer and the span of each field in it (in Batch's field order)."""

    data: Tensor
    spans: tuple[FieldSpan, ...]

    @classmethod
    def of(cls, batch: Batch) -> PackedBatch:
        tensors = [getattr(batch, f.name).contiguous() for f in fields(Batch)]
        spans, offset = [], 0
        for t in tensors:
            if t.dtype.itemsize > ALIGN:
                raise ValueError(f"a {t.dtype} field is wider than the buffer's {ALIGN}-byte alignment")
            spans.append(FieldSpan(offset, t.dtype, tuple(t.shape)))
            offset += -(-spans[-1].nbytes // ALIGN) * ALIGN
        data = torch.empty(offset, dtype=torch.uint8)
        for span, t in zip(spans, tensors, strict=True):
            data[span.offset : span.offset + span.nbytes].copy_(t.reshape(-1).view(torch.uint8))
        return cls(data, tuple(spans))

    def unpack(self) -> Batch:
        """The Batch as views of the buffer, on the buffer's device (no copy)."""
        views = [
            self.data[s.offset : s.offset + s.nbytes].view(s.dtype).view(s.shape) if s.nbytes else self.empty(s)
            for s in self.spans
        ]
        return Batch(*views)

    def empty(self, span: FieldSpan) -> Tensor:
        return torch.empty(span.shape, dtype=span.dtype, device=self.data.device)

    def pin_memory(self) -> PackedBatch:
        """The DataLoader's pin thread calls this: one buffer to pin."""
        return PackedBatch(self.data.pin_memory(), self.spans)

    def to(self, device, non_blocking: bool = True) -> PackedBatch:
        """One copy of the whole buffer (asynchronous from pinned memory)."""
        return PackedBatch(self.data.to(device, non_blocking=non_blocking), self.spans)


class PackedStream(torch.utils.data.IterableDataset):
    """A stream of Batches (training.data.ExampleStream) whose batches leave the worker packed."""

    def __init__(self, stream: torch.utils.data.IterableDataset) -> None:
        super().__init__()
        self.stream = stream

    def __iter__(self):
        return map(PackedBatch.of, iter(self.stream))


def host_and_device(item: Batch | PackedBatch, device) -> tuple[Batch, Batch]:
    """A loader's batch, plain or packed, as its CPU copy (for the layout) and its copy on `device`."""
    if isinstance(item, PackedBatch):
        return item.unpack(), item.to(device).unpack()
    return item, item.to(device)
