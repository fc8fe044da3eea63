"""A node's chunk store: chunk KV in memory (GPU, or CPU here) under a byte capacity, least recently used evicted.

The store and the Redis index change together: a call's chunks are registered right after they are stored, and the
entries of the chunks the call evicted are deleted just before (only where this store is still the holder; one
round trip each, whatever the number of chunks), so the index never points readers at KV that this store dropped on
purpose. A reader can still race an eviction; it then gets "missing" from the transfer service and re-prefills the
chunk.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from pdllm.cluster.kv.chunk_index import ChunkIndex

from pdllm.method.chunk_kv import ChunkKV


class StoreFull(RuntimeError):
    """A single chunk is larger than the store's whole capacity."""


class ChunkStore:
    def __init__(self, capacity_bytes: int, index: ChunkIndex | None, holder: str, node: str, address: str) -> None:
        self.capacity_bytes = capacity_bytes
        self.index, self.holder, self.node, self.address = index, holder, node, address
        self._entries: OrderedDict[str, ChunkKV] = OrderedDict()
        self._lock = threading.Lock()
        self.used_bytes = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, cid: str) -> bool:
        return cid in self._entries

    def put(self, chunk: ChunkKV) -> list[str]:
        """Store and register `chunk`, evicting least recently used chunks first; returns the evicted ids."""
        return self.put_all([chunk])

    def put_all(self, chunks: list[ChunkKV]) -> list[str]:
        """Store every chunk (evicting least recently used ones first) and register them in one index round trip;
        returns the evicted ids. Nothing is stored if one chunk alone is larger than the store."""
        for chunk in chunks:
            if chunk.nbytes() > self.capacity_bytes:
                raise StoreFull(
                    f"chunk {chunk.chunk_id[:12]} needs {chunk.nbytes()} bytes, the store holds {self.capacity_bytes}"
                )
        evicted = []
        with self._lock:
            for chunk in chunks:
                evicted += self._insert(chunk)
            held = [c for c in chunks if c.chunk_id in self._entries]  # not one a later chunk of the call evicted
            if self.index is not None:
                self.index.remove_all([c for c in evicted if c not in self._entries], self.holder)
                self.index.register_all(held, self.holder, self.node, self.address)
        return evicted

    def _insert(self, chunk: ChunkKV) -> list[str]:
        """Hold `chunk` as the most recently used, evicting the least recently used to fit (the caller takes
        their entries out of the index)."""
        if chunk.chunk_id in self._entries:
            self._entries.move_to_end(chunk.chunk_id)
            return []
        evicted, size = [], chunk.nbytes()
        while self.used_bytes + size > self.capacity_bytes and self._entries:
            cid, old = self._entries.popitem(last=False)
            self.used_bytes -= old.nbytes()
            self.evictions += 1
            evicted.append(cid)
        self._entries[chunk.chunk_id] = chunk
        self.used_bytes += size
        return evicted

    def get(self, cid: str) -> ChunkKV | None:
        """The chunk (marked as just used), or None if this store does not hold it."""
        with self._lock:
            chunk = self._entries.get(cid)
            if chunk is not None:
                self._entries.move_to_end(cid)
            return chunk

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def clear(self) -> None:
        """Drop everything and its index entries (shutdown)."""
        with self._lock:
            if self.index is not None:
                self.index.remove_all(list(self._entries), self.holder)
            self._entries.clear()
            self.used_bytes = 0

    def usage(self) -> dict:
        return {
            "chunks": len(self._entries),
            "used_bytes": self.used_bytes,
            "capacity_bytes": self.capacity_bytes,
            "evictions": self.evictions,
        }
