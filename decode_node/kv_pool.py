"""The resident chunk-KV pool of one decode device: preallocated pages, chunks keyed by id, pinned while read.

Layout (what the sparse kernel reads): per layer `k[layer]`, `v[layer]` of shape [pages, Hkv, page_rows, D]; a row
is named by its flat index page * page_rows + row. A chunk of R rows ([BOS] + tokens) lives in ceil(R / page_rows)
pages that need not be adjacent, so the pool never fragments and chunks of any size share it. Page 0 is a null page
of zeros (what masked kernel lanes and padded batch rows read); page 1 is a trash page (where batched writes with
nothing to write go). Jobs pin the chunks they read; unpinned chunks stay resident for later jobs and are evicted
least recently used when pages run out. A job's private rows (its question's KV, when kept) come from the same pages.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass

import torch
from torch import Tensor

from pdllm.errors import PdllmError
from pdllm.method.chunk_kv import ChunkKV
from pdllm.models.spec import ModelSpec

NULL_PAGE, TRASH_PAGE = 0, 1
RESERVED_PAGES = 2
DEFAULT_PAGE_ROWS = 32


class PoolFull(PdllmError):
    """The pool has no free or evictable pages for what was asked (every resident chunk is pinned)."""


@dataclass
class PoolEntry:
    pages: list[int]
    length: int  # rows ([BOS] + tokens)
    has_bos: bool
    rows: Tensor  # [length] int32 flat row indices on the pool's device
    pins: int = 0


def page_bytes(spec: ModelSpec, dtype: torch.dtype, page_rows: int) -> int:
    """Bytes one page costs across all layers, K and V."""
    return page_rows * spec.kv_bytes_per_token(torch.empty(0, dtype=dtype).element_size())


class KVPool:
    def __init__(
        self,
        spec: ModelSpec,
        device: torch.device | str,
        dtype: torch.dtype,
        capacity_bytes: int,
        page_rows: int = DEFAULT_PAGE_ROWS,
        keep_unpinned: bool = True,
    ) -> None:
        """`capacity_bytes` bounds K+V of every page (the reserved two included). `keep_unpinned` False drops a
        chunk as soon as no job reads it (every job then brings its chunks again: transfer benchmarks, tests)."""
        if page_rows < 1:
            raise ValueError(f"page_rows must be >= 1, got {page_rows}")
        self.spec, self.page_rows, self.keep_unpinned = spec, page_rows, keep_unpinned
        self.device = torch.device(device)
        self.num_pages = capacity_bytes // page_bytes(spec, dtype, page_rows)
        if self.num_pages < RESERVED_PAGES + 1:
            raise ValueError(
                f"decode pool of {capacity_bytes} bytes holds {self.num_pages} pages of {page_rows} rows; "
                f"at least {RESERVED_PAGES + 1} are needed"
            )
        shape = (spec.num_layers, self.num_pages, spec.num_kv_heads, page_rows, spec.head_dim)
        # empty, not zeros: untouched pages cost no host memory on CPU; only the null page must read as zeros
        self.k = torch.empty(shape, device=self.device, dtype=dtype)
        self.v = torch.empty(shape, device=self.device, dtype=dtype)
        self.k[:, NULL_PAGE].zero_()
        self.v[:, NULL_PAGE].zero_()
        self.free: list[int] = list(range(self.num_pages - 1, RESERVED_PAGES - 1, -1))  # pop() takes low pages
        self.chunks: OrderedDict[str, PoolEntry] = OrderedDict()  # LRU order: oldest first
        self.cond = threading.Condition()
        self._line: deque[int] = deque()  # tickets of jobs waiting for room, first come first
        self._tickets = 0
        self.evictions = 0
        self.inserted = 0

    @property
    def capacity_bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def pages_for(self, rows: int) -> int:
        return -(-rows // self.page_rows)

    def used_pages(self) -> int:
        with self.cond:
            return self.num_pages - RESERVED_PAGES - len(self.free)

    def snapshot(self) -> dict:
        with self.cond:
            pinned = sum(1 for e in self.chunks.values() if e.pins)
            return {
                "pages": self.num_pages,
                "free_pages": len(self.free),
                "chunks": len(self.chunks),
                "pinned_chunks": pinned,
                "jobs_waiting_for_room": len(self._line),
                "jobs_waited_for_room": self._tickets,  # since the start
                "bytes": self.capacity_bytes,
                "used_bytes": (self.num_pages - RESERVED_PAGES - len(self.free))
                * self.capacity_bytes
                // self.num_pages,
                "evictions": self.evictions,
                "inserted": self.inserted,
            }

    def __contains__(self, cid: str) -> bool:
        with self.cond:
            return cid in self.chunks

    # ---- chunks -------------------------------------------------------------------------------------------------

    def pin_resident(self, cids: list[str]) -> list[str]:
        """Pin every chunk of `cids` that is resident (once per id); returns the ids that are not."""
        missing = []
        with self.cond:
            for cid in dict.fromkeys(cids):
                entry = self.chunks.get(cid)
                if entry is None:
                    missing.append(cid)
                    continue
                entry.pins += 1
                self.chunks.move_to_end(cid)
        return missing

    def insert_pinned(self, chunks: list[ChunkKV]) -> None:
        """Copy `chunks` into pages and pin each, all or none (PoolFull leaves the pool as it was). A chunk that
        became resident meanwhile (another job brought it) is pinned instead of copied."""
        with self.cond:
            unique = list({c.chunk_id: c for c in chunks}.values())
            resident = [c.chunk_id for c in unique if c.chunk_id in self.chunks]
            for cid in resident:  # pinned first, so making room below cannot evict them
                self.chunks[cid].pins += 1
                self.chunks.move_to_end(cid)
            fresh = [c for c in unique if c.chunk_id not in self.chunks]
            try:
                pages = self._take_pages(sum(self.pages_for(c.length) for c in fresh))
            except PoolFull:
                self._unpin_locked(resident)
                raise
            at = 0
            for c in fresh:
                n = self.pages_for(c.length)
                mine, at = pages[at : at + n], at + n
                self._write(c, mine)
                self.chunks[c.chunk_id] = PoolEntry(mine, c.length, c.has_bos, self._rows(mine, c.length), pins=1)
                self.inserted += 1

    def acquire(self, cids: list[str], fetch, timeout_s: float, clock=time.monotonic) -> list[str]:
        """Pin every chunk of `cids`, bringing the missing ones through `fetch(missing) -> {cid: ChunkKV}` (a
        chunk it cannot bring is left out). Returns the ids that could not be had (nothing of them is pinned).

        While the pool has no room, the job waits in line (first come, first served) holding nothing: two jobs
        that each kept their resident chunks pinned while waiting for room could each wait on the other to their
        deadlines. A resident chunk evicted meanwhile is brought again. Raises PoolFull after `timeout_s`."""
        deadline = clock() + timeout_s
        got: dict[str, ChunkKV] = {}
        tried: set[str] = set()  # ids already asked of `fetch`
        ticket = self._join_line_if_waiting()
        try:
            while True:
                self._wait_turn(ticket, deadline, clock)
                missing = self.pin_resident(cids)
                resident = [c for c in dict.fromkeys(cids) if c not in missing]
                need = [c for c in missing if c not in got and c not in tried]
                try:
                    got.update(fetch(need) if need else {})
                except BaseException:
                    self.unpin(resident)
                    raise
                tried.update(need)
                try:
                    self.insert_pinned([got[c] for c in missing if c in got])
                    return [c for c in missing if c not in got]
                except PoolFull:
                    wanted = self._pages_of(resident, [got[c] for c in missing if c in got])
                    self.unpin(resident)  # hold nothing while waiting
                    if wanted > self.num_pages - RESERVED_PAGES:  # would never fit: refused now, not at the deadline
                        raise PoolFull(
                            f"decode KV pool too small for this job: its chunks need {wanted} pages, the pool has "
                            f"{self.num_pages - RESERVED_PAGES}; select fewer or smaller chunks, or give the pool "
                            f"more memory"
                        ) from None
                    if ticket is None:
                        ticket = self._join_line()
                    with self.cond:
                        if clock() >= deadline:
                            raise
                        self.cond.wait(min(deadline - clock(), 0.05))
        finally:
            self._leave_line(ticket)

    def _pages_of(self, resident: list[str], fresh: list[ChunkKV]) -> int:
        """Pages a job's chunks take: the resident ones (pinned) as they lie, the fresh ones once written."""
        with self.cond:
            held = sum(len(self.chunks[c].pages) for c in resident)
        return held + sum(self.pages_for(c.length) for c in fresh)

    def _join_line(self) -> int:
        with self.cond:
            self._tickets += 1
            self._line.append(self._tickets)
            self.cond.notify_all()
            return self._tickets

    def _join_line_if_waiting(self) -> int | None:
        """A place in line if jobs already wait for room (a newcomer does not pass them), else None."""
        with self.cond:
            return None if not self._line else self._join_line()

    def _wait_turn(self, ticket: int | None, deadline: float, clock) -> None:
        """Until `ticket` is first in line (None: not in line); PoolFull at the deadline."""
        if ticket is None:
            return
        with self.cond:
            while self._line[0] != ticket:
                left = deadline - clock()
                if left <= 0:
                    raise PoolFull(
                        f"decode KV pool full: {self._line.index(ticket)} job(s) still ahead in line at the "
                        f"deadline; every resident chunk is in use"
                    )
                self.cond.wait(min(left, 0.05))

    def _leave_line(self, ticket: int | None) -> None:
        if ticket is not None:
            with self.cond:
                self._line.remove(ticket)
                self.cond.notify_all()

    def unpin(self, cids: list[str]) -> None:
        with self.cond:
            self._unpin_locked(list(dict.fromkeys(cids)))

    def _unpin_locked(self, cids: list[str]) -> None:
        for cid in cids:
            entry = self.chunks.get(cid)
            if entry is None or entry.pins == 0:
                raise RuntimeError(f"chunk {cid[:12]} unpinned more often than pinned")
            entry.pins -= 1
            if entry.pins == 0 and not self.keep_unpinned:
                self._drop(cid)
        self.cond.notify_all()

    def entry(self, cid: str) -> PoolEntry:
        with self.cond:
            return self.chunks[cid]

    def chunk_keys(self, cid: str, layer: int) -> Tensor:
        """One resident chunk's keys at `layer`: [Hkv, length, D] (a gather, for token selection)."""
        entry = self.entry(cid)
        k = self.k[layer, entry.pages]  # [pages, Hkv, page_rows, D]
        return k.permute(1, 0, 2, 3).reshape(k.shape[1], -1, k.shape[3])[:, : entry.length]

    # ---- private rows (a job's own KV) -------------------------------------------------------------------------

    def alloc_rows(self, rows: int) -> tuple[list[int], Tensor]:
        """Pages for `rows` private rows (raises PoolFull); returns the pages and the rows' flat indices."""
        with self.cond:
            pages = self._take_pages(self.pages_for(rows))
        return pages, self._rows(pages, rows)

    def free_pages(self, pages: list[int]) -> None:
        with self.cond:
            self.free.extend(pages)
            self.cond.notify_all()

    # ---- internals ----------------------------------------------------------------------------------------------

    def _take_pages(self, n: int) -> list[int]:
        """n free pages, evicting unpinned chunks (least recently used first) as needed; caller holds the lock."""
        if n > len(self.free) + sum(len(e.pages) for e in self.chunks.values() if e.pins == 0):
            raise PoolFull(
                f"decode KV pool full: {n} pages wanted, {len(self.free)} free of {self.num_pages} and every "
                f"resident chunk is in use"
            )
        for cid in [c for c, e in self.chunks.items() if e.pins == 0]:
            if len(self.free) >= n:
                break
            self._drop(cid)
            self.evictions += 1
        return [self.free.pop() for _ in range(n)]

    def _drop(self, cid: str) -> None:
        self.free.extend(self.chunks.pop(cid).pages)

    def _rows(self, pages: list[int], length: int) -> Tensor:
        p = torch.tensor(pages, dtype=torch.int32)
        rows = (p[:, None] * self.page_rows + torch.arange(self.page_rows, dtype=torch.int32)[None]).flatten()
        return rows[:length].to(self.device)

    def _write(self, chunk: ChunkKV, pages: list[int]) -> None:
        k = chunk.k.to(device=self.device, dtype=self.k.dtype, non_blocking=True)
        v = chunk.v.to(device=self.device, dtype=self.v.dtype, non_blocking=True)
        for j, page in enumerate(pages):
            lo, hi = j * self.page_rows, min(chunk.length, (j + 1) * self.page_rows)
            self.k[:, page, :, : hi - lo] = k[:, :, lo:hi]
            self.v[:, page, :, : hi - lo] = v[:, :, lo:hi]
