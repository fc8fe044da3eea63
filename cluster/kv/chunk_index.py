"""The chunk index in Redis: chunk id -> where its KV lives (holder, transfer address), its size and layout,
created/last-used times, and the small summary that chunk ranking reads. Redis never holds the KV itself.

Keys (under a per-cluster prefix P):
  P:chunk:<id>  hash {holder, node, address, nbytes, dtype, layout, length, created, last_used, summary}
  P:ids         set of indexed chunk ids (its size is the index size)
  P:claim:<id>  prefill claim: SET NX with expiry, so two requests needing the same chunk encode it once and a
                dead claimant blocks others for at most the claim's TTL
  P:ready       pub/sub channel: each registered chunk id is published, so whoever waits for a chunk another actor
                claimed is told when it lands instead of polling
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import redis
from pdllm.cluster.kv.kv_codec import LAYOUT, dtype_name, pack_tensor, unpack_tensor
from pdllm.cluster.kv.redis_client import connect
from torch import Tensor

from pdllm.method.chunk_kv import ChunkKV
from pdllm.observability.counters import count

# Delete an entry only if the caller is still its holder (a newer holder's entry must survive a stale eviction).
# Delete each entry whose holder is ARGV[1] (KEYS: the entry keys, then the id set; ARGV[i + 1]: the id of KEYS[i]);
# returns how many.
_DELETE_ALL_IF_HOLDER = """
local ids, n = KEYS[#KEYS], 0
for i = 1, #KEYS - 1 do
  if redis.call('HGET', KEYS[i], 'holder') == ARGV[1] then
    redis.call('DEL', KEYS[i]); redis.call('SREM', ids, ARGV[i + 1]); n = n + 1
  end
end
return n
"""
_TOUCH = """
for _, k in ipairs(KEYS) do
  if redis.call('HEXISTS', k, 'holder') == 1 then redis.call('HSET', k, 'last_used', ARGV[1]) end
end
return 0
"""
# Claim each chunk that has no entry: per (entry key, claim key) pair, 2 if indexed, 1 if claimed now (or already
# ours), 0 if another owner holds the claim.
_CLAIM_ALL = """
local out = {}
for i = 1, #KEYS, 2 do
  if redis.call('HEXISTS', KEYS[i], 'holder') == 1 then out[#out + 1] = 2
  elseif redis.call('SET', KEYS[i + 1], ARGV[1], 'NX', 'PX', ARGV[2]) then out[#out + 1] = 1
  elseif redis.call('GET', KEYS[i + 1]) == ARGV[1] then out[#out + 1] = 1
  else out[#out + 1] = 0 end
end
return out
"""
WAITING, CLAIMED, INDEXED = "waiting", "claimed", "indexed"
CLAIM_STATES = (WAITING, CLAIMED, INDEXED)
# Release a claim only if the caller still owns it.
_RELEASE_IF_OWNER = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
# The same for every key; returns how many were released.
_RELEASE_ALL_IF_OWNER = """
local n = 0
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[1] then n = n + redis.call('DEL', KEYS[i]) end
end
return n
"""


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
        self._delete_all_if_holder = client.register_script(_DELETE_ALL_IF_HOLDER)
        self._release_if_owner = client.register_script(_RELEASE_IF_OWNER)
        self._release_all_if_owner = client.register_script(_RELEASE_ALL_IF_OWNER)
        self._touch = client.register_script(_TOUCH)
        self._claim_all = client.register_script(_CLAIM_ALL)

    @classmethod
    def from_url(cls, url: str, prefix: str = "pdllm:kv", timeout_s: float = 5.0) -> ChunkIndex:
        """A client that keeps working through a Redis restart (commands retried, see cluster/kv/redis_client.py)."""
        return cls(connect(url, timeout_s), prefix)

    def _key(self, cid: str) -> str:
        return f"{self.prefix}:chunk:{cid}"

    @property
    def _ids(self) -> str:
        return f"{self.prefix}:ids"

    @property
    def _ready(self) -> str:
        return f"{self.prefix}:ready"

    def register(self, chunk: ChunkKV, holder: str, node: str, address: str) -> IndexEntry:
        """Write `chunk`'s entry; returns it, so the writer can hand it on without a read."""
        return self.register_all([chunk], holder, node, address)[chunk.chunk_id]

    def register_all(self, chunks: list[ChunkKV], holder: str, node: str, address: str) -> dict[str, IndexEntry]:
        """Write every chunk's entry in one round trip; returns the entries by id. One pipeline, not a transaction
        (MULTI queues every summary before running any: slower for large documents). Redis runs a connection's
        commands in order, so the entries are written before the id set names them and before the `ready`
        messages wake a waiter that will read them."""
        if not chunks:
            return {}
        count("index.register")
        now, entries = time.time(), {}
        pipe = self.r.pipeline(transaction=False)
        for chunk in chunks:
            entry = entries[chunk.chunk_id] = entry_of(chunk, holder, node, address, now)
            mapping = {
                "holder": holder,
                "node": node,
                "address": address,
                "nbytes": entry.nbytes,
                "dtype": entry.dtype,
                "layout": LAYOUT,
                "length": entry.length,
                "created": entry.created,
                "last_used": entry.last_used,
                "summary": pack_tensor(chunk.summary),
            }
            pipe.hset(self._key(chunk.chunk_id), mapping=mapping)
        pipe.sadd(self._ids, *entries)
        for cid in entries:
            pipe.publish(self._ready, cid)
        pipe.execute()
        return entries

    def lookup(self, cids: list[str], summaries: bool = True) -> dict[str, IndexEntry]:
        """Entries of the indexed ids among `cids` (one round trip). `summaries=False` leaves the summaries (most
        of an entry's bytes) in Redis: for callers that only need to know where a chunk is, or have its summary."""
        if not cids:
            return {}
        count("index.lookup")
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
            count("index.touch")
            self._touch(keys=[self._key(c) for c in cids], args=[time.time()])

    def remove(self, cid: str, holder: str) -> bool:
        """Delete the entry if `holder` still holds it (eviction, or a reader that found the holder without it)."""
        return bool(self.remove_all([cid], holder))

    def remove_all(self, cids: list[str], holder: str) -> int:
        """`remove` for every id in one round trip (evictions of a call, a store's shutdown); returns how many."""
        if not cids:
            return 0
        count("index.remove")
        keys = [self._key(c) for c in cids] + [self._ids]
        return int(self._delete_all_if_holder(keys=keys, args=[holder, *cids]))

    def size(self) -> int:
        return int(self.r.scard(self._ids))

    def ids(self) -> set[str]:
        return {m.decode() for m in self.r.smembers(self._ids)}

    def claim(self, cid: str, owner: str, ttl_s: float) -> bool:
        """True if `owner` now holds the prefill claim on `cid` (expires after ttl_s). A retried SET whose first
        try went through finds its own owner there, and still counts as won."""
        count("index.claim")
        key = f"{self.prefix}:claim:{cid}"
        if self.r.set(key, owner, nx=True, px=max(1, int(ttl_s * 1000))):
            return True
        current = self.r.get(key)
        return current is not None and current.decode() == owner

    def claim_all(self, cids: list[str], owner: str, ttl_s: float) -> dict[str, str]:
        """Claim every id in one round trip: {id: CLAIMED (now `owner`'s, also when a retried call finds its own
        claim), INDEXED (an entry exists: registered since the caller looked), or WAITING (another owner's claim)}.
        The entry check and the claim are one atomic step, so no chunk is encoded twice or claimed after it landed."""
        if not cids:
            return {}
        count("index.claim")
        keys = [k for c in cids for k in (self._key(c), f"{self.prefix}:claim:{c}")]
        got = self._claim_all(keys=keys, args=[owner, max(1, int(ttl_s * 1000))])
        return {c: CLAIM_STATES[int(s)] for c, s in zip(cids, got, strict=True)}

    def release(self, cid: str, owner: str) -> None:
        self.release_all([cid], owner)

    def release_all(self, cids: list[str], owner: str) -> int:
        """Drop `owner`'s prefill claims on `cids` in one round trip (a claim another owner took since is left);
        returns how many were dropped."""
        if not cids:
            return 0
        count("index.release")
        return int(self._release_all_if_owner(keys=[f"{self.prefix}:claim:{c}" for c in cids], args=[owner]))

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
        count("index.claimed")
        values = self.r.mget([f"{self.prefix}:claim:{c}" for c in cids])
        return {c: v is not None for c, v in zip(cids, values, strict=True)}

    def wait_for(
        self, cids: list[str], until: float, recheck_s: float = 1.0, on_waiting: Callable[[], None] | None = None
    ) -> tuple[dict[str, IndexEntry], list[str]]:
        """Wait until each of `cids` (claimed by other prefill actors) is registered, told by the `ready` channel;
        returns their entries and the ids whose claim vanished without an entry (the claimant died: prefill them
        again). Claims are looked at every `recheck_s` at most. Past `until` (monotonic): TimeoutError.
        `on_waiting()` runs once subscribed and the ids already there are read (tests)."""
        if not cids:
            return {}, []
        pubsub = self.r.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(self._ready)
            found = self.lookup(
                sorted(set(cids)), summaries=False
            )  # after subscribing: a chunk landing now is still heard of
            pending, dead = set(cids) - set(found), []
            if on_waiting is not None:
                on_waiting()
            checked = time.monotonic()
            while pending:
                left = until - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{len(pending)} chunks claimed by another prefill actor never appeared")
                landed = set()
                message = pubsub.get_message(timeout=min(recheck_s, left))
                while message is not None:  # this one and any others already queued
                    if message.get("type") == "message":
                        landed.add(message["data"].decode())
                    message = pubsub.get_message(timeout=0)
                if landed & pending:
                    got = self.lookup(sorted(landed & pending), summaries=False)
                    found.update(got)
                    pending -= set(got)
                if pending and time.monotonic() - checked >= recheck_s:  # is every claimant still at work?
                    checked = time.monotonic()
                    unclaimed = [cid for cid, held in self.claimed(sorted(pending)).items() if not held]
                    late = self.lookup(unclaimed, summaries=False)  # registered between the two reads
                    found.update(late)
                    dead += [cid for cid in unclaimed if cid not in late]
                    pending -= set(unclaimed)
            return found, dead
        finally:
            pubsub.close()

    def remove_holder(self, holder: str, batch: int = 500) -> int:
        """Delete every entry of `holder` (its store is gone: shutdown, or the actor died); returns how many."""
        removed, ids = 0, sorted(self.ids())
        for i in range(0, len(ids), batch):
            part = ids[i : i + batch]
            pipe = self.r.pipeline(transaction=False)
            for cid in part:
                pipe.hget(self._key(cid), "holder")
            owners = pipe.execute()
            removed += self.remove_all([c for c, o in zip(part, owners, strict=True) if o == holder.encode()], holder)
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


def entry_of(chunk: ChunkKV, holder: str, node: str, address: str, now: float) -> IndexEntry:
    """The entry `register` writes for `chunk` at time `now`."""
    return IndexEntry(
        chunk_id=chunk.chunk_id,
        holder=holder,
        node=node,
        address=address,
        nbytes=chunk.nbytes(),
        dtype=dtype_name(chunk.k.dtype),
        layout=LAYOUT,
        length=chunk.length,
        created=now,
        last_used=now,
        summary=chunk.summary.detach().cpu(),
    )


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
