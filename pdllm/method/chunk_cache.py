"""In-process chunk cache: chunk id -> ChunkKV, least recently used evicted past a byte budget.

A chunk seen again (same model, tokens and chunking parameters) is never re-encoded while it stays cached.
Thread-safe: requests served side by side (`pdllm serve --in-process` runs several into the decode engine's
batch) share it, and a document that several of them ask about at once is encoded once (encodes take turns; a
request whose chunks are all cached never waits for another's encode).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from pdllm.method.chunk_kv import ChunkKV
from pdllm.method.chunks import chunk_id
from pdllm.method.config import MethodConfig
from pdllm.method.prefill import encode_chunks


@dataclass
class Lookup:
    chunks: list[ChunkKV]  # one per requested chunk, in order
    encoded: int  # chunks encoded by this call
    reused: int  # chunks served from the cache


class ChunkCache:
    def __init__(self, max_bytes: int = 4 << 30) -> None:
        self.max_bytes = max_bytes
        self.entries: OrderedDict[str, ChunkKV] = OrderedDict()
        self.bytes = 0
        self._lock = threading.RLock()  # the entries and their byte count
        self._encoding = threading.Lock()  # one encode at a time, so two requests never encode the same chunk

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, cid: str) -> bool:
        return cid in self.entries

    def get(self, cid: str) -> ChunkKV | None:
        with self._lock:
            entry = self.entries.get(cid)
            if entry is not None:
                self.entries.move_to_end(cid)
            return entry

    def put(self, entry: ChunkKV) -> None:
        with self._lock:
            if entry.chunk_id in self.entries:
                self.entries.move_to_end(entry.chunk_id)
                return
            self.entries[entry.chunk_id] = entry
            self.bytes += entry.nbytes()
            while self.bytes > self.max_bytes and len(self.entries) > 1:
                _, old = self.entries.popitem(last=False)
                self.bytes -= old.nbytes()

    def _split(self, ids: list[str], chunks: list[list[int]]) -> tuple[dict[str, ChunkKV], dict[str, list[int]]]:
        """(cached entries by id, tokens of the ids not cached); a chunk repeated in the request appears once."""
        found = {cid: e for cid in ids if (e := self.get(cid)) is not None}
        missing: dict[str, list[int]] = {}
        for cid, c in zip(ids, chunks, strict=True):
            if cid not in found:
                missing.setdefault(cid, c)
        return found, missing

    def get_or_encode(self, lm, chunks: list[list[int]], cfg: MethodConfig, model_id: str) -> Lookup:
        """The ChunkKV of every chunk, encoding (in one batched pass) only those not cached; a chunk repeated
        inside the request is encoded once."""
        ids = [chunk_id(model_id, c, cfg.chunk_size, cfg.use_bos) for c in chunks]
        found, missing = self._split(ids, chunks)
        fresh: dict[str, ChunkKV] = {}
        if missing:
            with self._encoding:  # another request may have encoded them while this one waited
                found, missing = self._split(ids, chunks)
                if missing:
                    fresh = {e.chunk_id: e for e in encode_chunks(lm, list(missing.values()), cfg, model_id)}
                for e in fresh.values():
                    self.put(e)
        every = {**found, **fresh}
        return Lookup(chunks=[every[cid] for cid in ids], encoded=len(fresh), reused=len(ids) - len(missing))
