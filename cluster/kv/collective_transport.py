"""Chunk KV over the collective group (NCCL between GPUs, gloo on CPU): the holder's sender and the decode side's
KVTransport, which falls back to gRPC whenever the collective path is not chosen or fails.

One fetch from one holder is two calls over the control path (Ray) around one batch of tensor operations:
  1. announce: the receiver asks the holder to `collective_prepare(transfer id, items)`; the holder pins the
     tensors (K, V, summary per chunk; selected rows only, when asked) and answers their dtypes, shapes and
     checksums, plus the chunks it no longer has.
  2. transfer: the receiver calls `collective_send(transfer id)` (the Ray call goes out first, so a peer that must
     first build its communicator is already on its way), then posts one receive per announced tensor into buffers
     of exactly the announced shapes. Both ends post in announcement order and a receiver runs one transfer per
     holder at a time, so sends and receives always pair up. Both ends wait with deadlines.
  3. verify: the receiver recomputes each tensor's checksum where it landed.
Any failure after the receives were posted breaks the group for this process (a pending operation could pair with a
later one); a failure before (peer dead, stalled, refusing) only takes that peer off. Either way the chunks in
question are fetched over gRPC in the same call, within the caller's timeout.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass

import ray
import torch
from pdllm.cluster.kv.chunk_store import ChunkStore
from pdllm.cluster.kv.collective_group import CollectiveError, CollectiveGroup, CollectiveMember, Member, choose_path
from pdllm.cluster.kv.kv_codec import DTYPES, LAYOUT, dtype_name
from pdllm.cluster.kv.transport import FetchItem, FetchResult, KVTransport, TransferError
from torch import Tensor

from pdllm.method.chunk_kv import ChunkKV

log = logging.getLogger(__name__)

_COLS = 1024  # checksum: words per row (4 KiB of 32-bit words); rows are weighted by their position
_SLICE = 1 << 24  # checksum: words per slice (bounds its temporary memory)
MAX_ANNOUNCED_BYTES = 1 << 40  # a larger announcement is malformed, not a chunk


def checksum(t: Tensor) -> int:
    """Sum of the tensor's 32-bit words (16- or 8-bit when its size is not a multiple of 4) per 4 KiB row, the rows
    weighted by position: one read of the data, where it lives. Integer sums wrap modulo 2^64 in any order, so
    sender (GPU 0) and receiver (GPU 1) agree exactly; a flipped bit or a moved or shifted block changes it (a
    permutation inside one row does not: transports lose, duplicate or misplace whole pieces, they don't shuffle)."""
    raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
    n = raw.numel()
    words = raw.view(torch.int32) if n % 4 == 0 else raw.view(torch.int16) if n % 2 == 0 else raw.to(torch.int32)
    total = torch.zeros((), dtype=torch.int64, device=words.device)
    for lo in range(0, words.numel(), _SLICE):
        part = words[lo : lo + _SLICE]
        full = part.numel() // _COLS * _COLS
        rows = part[:full].view(-1, _COLS).sum(dim=1, dtype=torch.int64)
        first = lo // _COLS + 1
        weights = torch.arange(first, first + rows.numel(), dtype=torch.int64, device=words.device)
        total = total + (rows * weights).sum() + part[full:].sum(dtype=torch.int64) * (first + rows.numel())
    return int(total.item()) ^ n


def chunk_tensors(chunk: ChunkKV, rows: list[int] | None, device: str) -> list[Tensor]:
    """K, V (only token `rows` when given) and the summary, contiguous, on the device the backend sends from."""
    k, v = chunk.k, chunk.v
    if rows:
        index = torch.tensor(rows, dtype=torch.long, device=k.device)
        k, v = k.index_select(2, index), v.index_select(2, index)
    return [t.to(device).contiguous() for t in (k, v, chunk.summary)]


def announce(chunk: ChunkKV, rows: list[int] | None, tensors: list[Tensor], verify: bool) -> dict:
    """What the receiver needs before any tensor moves: the chunk's metadata and each tensor's dtype and shape."""
    return {
        "chunk_id": chunk.chunk_id,
        "tokens": list(chunk.tokens),
        "has_bos": chunk.has_bos,
        "rows": list(rows) if rows else None,
        "layout": LAYOUT,
        "tensors": [[dtype_name(t.dtype), list(t.shape)] for t in tensors],
        "checksums": [checksum(t) for t in tensors] if verify else None,
    }


def buffers_for(header: dict, device: str) -> list[Tensor]:
    """Empty receive buffers of exactly the announced dtypes and shapes; a malformed announcement is an error."""
    if header.get("layout") != LAYOUT:
        raise ValueError(f"unknown chunk KV layout {header.get('layout')!r}")
    specs = header.get("tensors") or []
    if len(specs) != 3:
        raise ValueError(f"chunk {str(header.get('chunk_id'))[:12]}: {len(specs)} tensors announced, expected 3")
    out, total = [], 0
    for dtype, shape in specs:
        if dtype not in DTYPES or not isinstance(shape, list) or any(not isinstance(d, int) or d < 0 for d in shape):
            raise ValueError(f"chunk {str(header.get('chunk_id'))[:12]}: bad tensor {dtype} {shape}")
        total += _nbytes(dtype, shape)
        if total > MAX_ANNOUNCED_BYTES:
            raise ValueError(f"chunk {str(header.get('chunk_id'))[:12]}: over {MAX_ANNOUNCED_BYTES} bytes announced")
        out.append(torch.empty(shape, dtype=DTYPES[dtype], device=device))
    return out


def _nbytes(dtype: str, shape: list[int]) -> int:
    n = DTYPES[dtype].itemsize
    for d in shape:
        n *= d
    return n


@dataclass
class _Pinned:
    peer: str
    peer_rank: int
    tensors: list[Tensor]
    at: float


class CollectiveSender:
    """The holder's side: pins announced tensors until their transfer (or `ttl_s`), then sends them."""

    def __init__(self, group: CollectiveGroup, store: ChunkStore, ttl_s: float = 60.0, verify: bool = True) -> None:
        self.group, self.store, self.ttl_s, self.verify = group, store, ttl_s, verify
        self._pinned: dict[str, _Pinned] = {}
        self._lock = threading.Lock()

    def prepare(self, transfer_id: str, peer: str, requests: list[tuple[str, list[int]]]) -> dict:
        """Announce `requests` ((chunk id, rows)) to `peer`: {"headers", "missing"}, or {"refused": why} when the
        collective path is off here, or {"error": why} for a bad request (nothing is pinned then)."""
        spec = self.group.spec
        if not self.group.usable or spec is None:
            return {"refused": self.group.broken or "not in a collective group"}
        if spec.member(peer) is None:
            return {"refused": f"{peer} is not in collective group {spec.group_id}"}
        if not self.group.usable_with(peer):
            return {"refused": self.group.peers_off[peer]}
        self._expire()
        device = "cpu" if spec.backend == "gloo" else "cuda"
        headers, tensors, missing = [], [], []
        for cid, rows in requests:
            chunk = self.store.get(cid)
            if chunk is None:
                missing.append(cid)
                continue
            if rows and (min(rows) < 0 or max(rows) >= chunk.length):
                return {"error": f"rows out of range for chunk {cid[:12]} ({chunk.length} rows)"}
            parts = chunk_tensors(chunk, rows or None, device)
            headers.append(announce(chunk, rows or None, parts, self.verify))
            tensors += parts
        if tensors:
            with self._lock:
                self._pinned[transfer_id] = _Pinned(peer, spec.rank(peer), tensors, time.monotonic())
        return {"headers": headers, "missing": missing}

    def send(self, transfer_id: str) -> dict:
        """Send a prepared transfer's tensors in announcement order: {"ok": True, "bytes"} or {"ok": False, "error"}."""
        with self._lock:
            pinned = self._pinned.pop(transfer_id, None)
        if pinned is None:
            return {"ok": False, "error": f"transfer {transfer_id} is unknown here or expired (ttl {self.ttl_s}s)"}
        if not self.group.usable_with(pinned.peer):
            reason = self.group.broken or self.group.peers_off.get(pinned.peer)
            return {"ok": False, "error": f"collective path off: {reason}"}
        what = f"{self.group.me.name} sending {len(pinned.tensors)} tensors to {pinned.peer} (rank {pinned.peer_rank})"
        try:
            works = self.group.post([("send", t, pinned.peer_rank) for t in pinned.tensors])
            self.group.wait(works, time.monotonic() + self.group.spec.timeout_s, what)
        except Exception as e:  # CollectiveError, or the library's own error while posting
            reason = str(e) if isinstance(e, CollectiveError) else f"{what}: {type(e).__name__}: {e}"
            self.group.take_off(pinned.peer, reason, posted=True)
            return {"ok": False, "error": reason}
        nbytes = sum(t.numel() * t.element_size() for t in pinned.tensors)
        self.group.sent_bytes += nbytes
        return {"ok": True, "bytes": nbytes}

    def _expire(self) -> None:
        now = time.monotonic()
        with self._lock:
            for tid in [t for t, p in self._pinned.items() if now - p.at > self.ttl_s]:
                del self._pinned[tid]


class CollectiveHolder(CollectiveMember):
    """Ray-callable sender methods, mixed into the prefill worker (which sets `self.kv_sender`)."""

    kv_sender: CollectiveSender

    def collective_prepare(self, transfer_id: str, peer: str, requests: list[tuple[str, list[int]]]) -> dict:
        return self.kv_sender.prepare(transfer_id, peer, requests)

    def collective_send(self, transfer_id: str) -> dict:
        return self.kv_sender.send(transfer_id)


class CollectiveTransport:
    """KVTransport: chunks of holders in this process's collective group come over it; the rest, and anything whose
    collective fetch failed, over `fallback` (gRPC) within the same call."""

    def __init__(self, group: CollectiveGroup, fallback: KVTransport, device: str = "cpu") -> None:
        self.group, self.fallback = group, fallback
        self.device = device  # where received KV lands (the decode actor's device)
        self.fallbacks = 0
        self.last_error = ""
        self._handles: dict[str, object] = {}
        self._peer_locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def _peer(self, address: str) -> Member | None:
        spec = self.group.spec
        if not self.group.usable or spec is None:
            return None
        peer = spec.holder_at(address)
        if peer is None or not self.group.usable_with(peer.name) or choose_path(spec, self.group.me, peer) == "grpc":
            return None
        return peer

    def serves_directly(self, address: str) -> bool:
        """True when the holder at `address` is reached device to device (preferred over same-node Ray reads)."""
        return self._peer(address) is not None

    def fetch(self, items: list[FetchItem], timeout_s: float) -> FetchResult:
        deadline = time.monotonic() + timeout_s
        result, rest = FetchResult(), []
        by_peer: dict[str, tuple[Member, list[FetchItem]]] = {}
        for item in items:
            peer = self._peer(item.address)
            if peer is None:
                rest.append(item)
            else:
                by_peer.setdefault(peer.name, (peer, []))[1].append(item)
        for peer, group in by_peer.values():
            spec = self.group.spec
            if spec is None or not self.group.usable_with(peer.name):  # an earlier failure took it off
                rest += group
                continue
            try:
                got = self._fetch_from(peer, group, min(deadline, time.monotonic() + spec.timeout_s))
            except CollectiveError as e:  # announce/receive already took the peer or the group off
                self.fallbacks += 1
                self.last_error = str(e)
                rest += group
                continue
            result.chunks.update(got.chunks)
            result.missing += got.missing
            result.bytes += got.bytes
            result.paths[spec.backend] = result.paths.get(spec.backend, 0) + len(got.chunks)
        if rest:
            fell = self.fallback.fetch(rest, max(0.5, deadline - time.monotonic()))
            result.chunks.update(fell.chunks)
            result.missing += fell.missing
            result.bytes += fell.bytes
            for path, n in fell.paths.items():
                result.paths[path] = result.paths.get(path, 0) + n
        return result

    def _handle(self, name: str):
        with self._lock:
            if name not in self._handles:
                self._handles[name] = ray.get_actor(name)
            return self._handles[name]

    def _peer_lock(self, name: str) -> threading.Lock:
        with self._lock:
            return self._peer_locks.setdefault(name, threading.Lock())

    def announce(self, peer: Member, items: list[FetchItem], deadline: float) -> tuple[str, dict]:
        """Phase 1: ask the holder to pin and describe the items; (transfer id, its reply); CollectiveError
        (the peer taken off) when it cannot, TransferError for a request the holder rejects."""
        me, rank = self.group.me, self.group.spec.rank(peer.name)
        tid = uuid.uuid4().hex
        requests = [(i.chunk_id, list(i.rows)) for i in items]
        try:
            handle = self._handle(peer.name)
            reply = ray.get(handle.collective_prepare.remote(tid, me.name, requests), timeout=_left(deadline))
        except Exception as e:  # ValueError (no such actor), RayActorError, GetTimeoutError
            raise self._peer_down(peer, f"{peer.name} (rank {rank}) did not announce: {type(e).__name__}: {e}") from e
        if "refused" in reply:
            raise self._peer_down(peer, f"{peer.name} (rank {rank}) refused a collective transfer: {reply['refused']}")
        if "error" in reply:
            raise TransferError(f"fetch from {peer.name}: {reply['error']}")  # bad input: gRPC would refuse it too
        return tid, reply

    def _peer_down(self, peer: Member, reason: str) -> CollectiveError:
        """Nothing was posted yet: only this holder goes over gRPC from now on; the group stays usable."""
        self.group.take_off(peer.name, reason, posted=False)
        return CollectiveError(reason)

    def receive(self, peer: Member, tid: str, reply: dict, deadline: float) -> FetchResult:
        """Phases 2 and 3 for an announced transfer: receive into buffers of the announced shapes, then verify."""
        rank = self.group.spec.rank(peer.name)
        wire = "cpu" if self.group.spec.backend == "gloo" else "cuda"
        result = FetchResult(missing=list(reply.get("missing", [])))
        headers = reply.get("headers", [])
        try:
            buffers = [buffers_for(h, wire) for h in headers]
        except ValueError as e:
            raise self._peer_down(peer, f"{peer.name} (rank {rank}) announced a malformed transfer: {e}") from e
        if not headers:
            return result
        flat = [t for bufs in buffers for t in bufs]
        what = f"receiving {len(flat)} tensors from {peer.name} (rank {rank})"
        try:
            self._transfer(peer, tid, rank, flat, deadline, what)
            for header, bufs in zip(headers, buffers, strict=True):
                wants = header.get("checksums") or [None] * 3
                for name, t, want in zip(("k", "v", "summary"), bufs, wants, strict=True):
                    if want is not None and checksum(t) != want:
                        raise CollectiveError(f"{what}: chunk {header['chunk_id'][:12]} {name}: checksum mismatch")
        except CollectiveError as e:
            self.group.take_off(peer.name, str(e), posted=True)  # receives may still be posted: never again
            raise
        for header, bufs in zip(headers, buffers, strict=True):
            k, v, summary = (t if t.device.type == self.device else t.to(self.device) for t in bufs)
            chunk = ChunkKV(header["chunk_id"], list(header["tokens"]), k, v, summary, header["has_bos"])
            result.chunks[chunk.chunk_id] = chunk
            result.bytes += chunk.nbytes()
        self.group.received_bytes += result.bytes
        return result

    def _transfer(self, peer: Member, tid: str, rank: int, flat: list[Tensor], deadline: float, what: str) -> None:
        """Ask for the send (first, so a peer building its communicator is on its way), post the receives, wait."""
        handle = self._handle(peer.name)
        with self._peer_lock(peer.name):
            sent = handle.collective_send.remote(tid)
            try:
                works = self.group.post([("recv", t, rank) for t in flat])
            except Exception as e:
                raise CollectiveError(f"{what}: posting failed: {type(e).__name__}: {e}") from e
            self.group.wait(works, deadline, what, abort=lambda: _send_failure(sent))
            try:
                ack = ray.get(sent, timeout=_left(deadline))
            except Exception as e:
                raise CollectiveError(f"{what}: no acknowledgement: {type(e).__name__}: {e}") from e
            if not ack.get("ok"):
                raise CollectiveError(f"{what}: the sender failed: {ack.get('error')}")

    def _fetch_from(self, peer: Member, items: list[FetchItem], deadline: float) -> FetchResult:
        tid, reply = self.announce(peer, items, deadline)
        return self.receive(peer, tid, reply, deadline)

    def status(self) -> dict:
        return {
            **self.group.status(),
            "fallbacks": self.fallbacks,
            "last_error": self.last_error,
        }

    def close(self) -> None:
        close = getattr(self.fallback, "close", None)
        if close is not None:
            close()


def _left(deadline: float) -> float:
    return max(0.05, deadline - time.monotonic())


def _send_failure(ref) -> str | None:
    """The sender's reply, if it already came back as a failure (so the receiver stops waiting early)."""
    ready, _ = ray.wait([ref], timeout=0)
    if not ready:
        return None
    try:
        ack = ray.get(ref, timeout=0.1)
    except Exception as e:
        return f"the sender failed: {type(e).__name__}: {e}"
    return None if ack.get("ok") else f"the sender failed: {ack.get('error')}"
