"""The chunk index in Redis: chunk id -> where its KV lives (holder, transfer address), its size and layout,
created/last-used times, and the small summary that chunk ranking reads. Redis never holds the KV itself.

Keys (under a per-cluster prefix P):
  P:chunk:<id>  hash {holder, node, address, nbytes, dtype, layout, length, created, last_used, summary}
  P:ids         set of indexed chunk ids (its size is the index size)
  P:claim:<id>  prefill claim: SET NX with expiry, so two requests needing the same chunk encode it once and a
                dead claimant blocks others for at most the claim's TTL
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis
from pdllm.cluster.kv_codec import LAYOUT, dtype_name, pack_tensor, unpack_tensor
from pdllm.cluster.redis_client import connect
from torch import Tensor

from pdllm.method.chunk_kv import ChunkKV

# Delete an entry only if the caller is still its holder (a newer holder's entry must survive a stale eviction).
_DELETE_IF_HOLDER = """
if redis.call('HGET', KEYS[1], 'holder') == ARGV[1] then
  redis.call('DEL', KEYS[1]); redis.call('SREM', KEYS[2], ARGV[2]); return 1
end
return 0
"""
_TOUCH = """
for _, k in ipairs(KEYS) do
  if redis.call('HEXISTS', k, 'holder') == 1 then redis.call('HSET', k, 'last_used', ARGV[1]) end
end
return 0
"""
# Release a claim only if the caller still owns it.
_RELEASE_IF_OWNER = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


@dataclass(frozen=True)
class IndexEntry:
    chunk_id: str
    holder: str  # the prefill actor (Ray actor name) whose chunk store holds the KV
    node: str  # Ray node id of the holder (same node: read without the network)
    address: str  # host:port of the holder's ChunkTransfer gRPC service
    nbytes: int
    dtype: str
    layout: str
    length: int  # K/V rows (tokens + BOS)
    created: float
    last_used: float
    summary: Tensor | None  # None when read without it (lookup(summaries=False))


class ChunkIndex:
    def __init__(self, client: redis.Redis, prefix: str = "pdllm:kv") -> None:
        self.r, self.prefix = client, prefix
        self._delete_if_holder = client.register_script(_DELETE_IF_HOLDER)
        self._release_if_owner = client.register_script(_RELEASE_IF_OWNER)
        self._touch = client.register_script(_TOUCH)

    @classmethod
    def from_url(cls, url: str, prefix: str = "pdllm:kv", timeout_s: float = 5.0) -> ChunkIndex:
        """A client that keeps working through a Redis restart (commands retried, see cluster/redis_client.py)."""
        return cls(connect(url, timeout_s), prefix)

    def _key(self, cid: str) -> str:
        return f"{self.prefix}:chunk:{cid}"

    @property
    def _ids(self) -> str:
        return f"{self.prefix}:ids"

    def register(self, chunk: ChunkKV, holder: str, node: str, address: str) -> None:
        now = time.time()
        mapping = {
            "holder": holder,
            "node": node,
            "address": address,
            "nbytes": chunk.nbytes(),
            "dtype": dtype_name(chunk.k.dtype),
            "layout": LAYOUT,
            "length": chunk.length,
            "created": now,
            "last_used": now,
            "summary": pack_tensor(chunk.summary),
        }
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(self._key(chunk.chunk_id), mapping=mapping)
        pipe.sadd(self._ids, chunk.chunk_id)
        pipe.execute()

    def lookup(self, cids: list[str], summaries: bool = True) -> dict[str, IndexEntry]:
        """Entries of the indexed ids among `cids` (one round trip). `summaries=False` leaves the summaries (most
        of an entry's bytes) in Redis: for callers that only need to know where a chunk is, or have its summary."""
        if not cids:
            return {}
        pipe = self.r.pipeline(transaction=False)
        for cid in cids:
            if summaries:
                pipe.hgetall(self._key(cid))
            else:
                pipe.hmget(self._key(cid), ENTRY_FIELDS)
        out = {}
        for cid, h in zip(cids, pipe.execute(), strict=True):
            if not summaries:
                h = {k.encode(): v for k, v in zip(ENTRY_FIELDS, h, strict=True) if v is not None}
            if h and b"holder" in h:
                out[cid] = _entry(cid, h)
        return out

    def touch(self, cids: list[str]) -> None:
        """Record a use (last_used) on entries that still exist (a touch racing a delete recreates nothing)."""
        if cids:
            self._touch(keys=[self._key(c) for c in cids], args=[time.time()])

    def remove(self, cid: str, holder: str) -> bool:
        """Delete the entry if `holder` still holds it (eviction, or a reader that found the holder without it)."""
        return bool(self._delete_if_holder(keys=[self._key(cid), self._ids], args=[holder, cid]))

    def size(self) -> int:
        return int(self.r.scard(self._ids))

    def ids(self) -> set[str]:
        return {m.decode() for m in self.r.smembers(self._ids)}

    def claim(self, cid: str, owner: str, ttl_s: float) -> bool:
        """True if `owner` now holds the prefill claim on `cid` (expires after ttl_s). A retried SET whose first
        try went through finds its own owner there, and still counts as won."""
        key = f"{self.prefix}:claim:{cid}"
        if self.r.set(key, owner, nx=True, px=max(1, int(ttl_s * 1000))):
            return True
        current = self.r.get(key)
        return current is not None and current.decode() == owner

    def release(self, cid: str, owner: str) -> None:
        self._release_if_owner(keys=[f"{self.prefix}:claim:{cid}"], args=[owner])

    def release_claims_of(self, holder: str) -> int:
        """Drop every prefill claim taken by `holder` (owners are "holder:nonce"): its process died, so the chunks
        it was encoding are free to claim at once instead of after the claims' TTL; returns how many."""
        released, mine = 0, f"{holder}:".encode()
        for key in self.r.scan_iter(match=f"{self.prefix}:claim:*", count=500):
            owner = self.r.get(key)
            if owner is not None and owner.startswith(mine):
                released += self._release_if_owner(keys=[key], args=[owner.decode()]) or 0
        return int(released)

    def claimed(self, cids: list[str]) -> dict[str, bool]:
        if not cids:
            return {}
        values = self.r.mget([f"{self.prefix}:claim:{c}" for c in cids])
        return {c: v is not None for c, v in zip(cids, values, strict=True)}

    def remove_holder(self, holder: str, batch: int = 500) -> int:
        """Delete every entry of `holder` (its store is gone: shutdown, or the actor died); returns how many."""
        removed, ids = 0, sorted(self.ids())
        for i in range(0, len(ids), batch):
            part = ids[i : i + batch]
            pipe = self.r.pipeline(transaction=False)
            for cid in part:
                pipe.hget(self._key(cid), "holder")
            for cid, owner in zip(part, pipe.execute(), strict=True):
                if owner is not None and owner.decode() == holder:
                    removed += self.remove(cid, holder)
        return removed

    def holders(self) -> dict[str, int]:
        """Entries per holder (status, and tests that look for entries left by a lost holder)."""
        counts: dict[str, int] = {}
        ids = sorted(self.ids())
        pipe = self.r.pipeline(transaction=False)
        for cid in ids:
            pipe.hget(self._key(cid), "holder")
        for owner in pipe.execute() if ids else []:
            if owner is not None:
                counts[owner.decode()] = counts.get(owner.decode(), 0) + 1
        return counts


ENTRY_FIELDS = ("holder", "node", "address", "nbytes", "dtype", "layout", "length", "created", "last_used")


def _entry(cid: str, h: dict[bytes, bytes]) -> IndexEntry:
    return IndexEntry(
        chunk_id=cid,
        holder=h[b"holder"].decode(),
        node=h[b"node"].decode(),
        address=h[b"address"].decode(),
        nbytes=int(h[b"nbytes"]),
        dtype=h[b"dtype"].decode(),
        layout=h[b"layout"].decode(),
        length=int(h[b"length"]),
        created=float(h[b"created"]),
        last_used=float(h[b"last_used"]),
        summary=unpack_tensor(h[b"summary"]) if b"summary" in h else None,
    )
