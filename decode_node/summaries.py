"""Chunk summaries kept on the decode actor's device, by chunk id.

Ranking reads every chunk's summary for every request; a chunk id names the chunk's content (model, tokens,
chunking), so its summary never changes. Read from the index once, it is kept here (least recently used dropped past
a byte budget), and later requests read only the index's small fields (where each chunk is).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import Tensor

DEFAULT_SUMMARY_BYTES = 256 << 20


class SummaryCache:
    def __init__(self, device: torch.device | str, max_bytes: int = DEFAULT_SUMMARY_BYTES) -> None:
        self.device, self.max_bytes = torch.device(device), max_bytes
        self._entries: OrderedDict[str, Tensor] = OrderedDict()
        self.bytes = 0
        self.reads = 0  # summaries read through `read` (index round trips carry several)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, cids: list[str], read: Callable[[list[str]], dict[str, Tensor | None]]) -> dict[str, Tensor]:
        """Summaries of `cids` (float32, on the device); those not kept come from `read(missing ids)` in one call.
        An id that `read` does not answer (its entry is gone) is left out of the result."""
        with self._lock:
            out = {c: self._touch(c) for c in cids if c in self._entries}
        missing = [c for c in dict.fromkeys(cids) if c not in out]
        if missing:
            fresh = {c: s.to(self.device, torch.float32) for c, s in read(missing).items() if s is not None}
            self.reads += len(fresh)
            with self._lock:
                for c, s in fresh.items():
                    self._put(c, s)
            out.update(fresh)
        return out

    def _touch(self, cid: str) -> Tensor:
        self._entries.move_to_end(cid)
        return self._entries[cid]

    def _put(self, cid: str, summary: Tensor) -> None:
        if cid in self._entries:
            return
        self._entries[cid] = summary
        self.bytes += summary.numel() * summary.element_size()
        while self.bytes > self.max_bytes and len(self._entries) > 1:
            _, old = self._entries.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()
