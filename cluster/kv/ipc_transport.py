"""Chunk KV between processes on one GPU by CUDA IPC: the holder exports its chunk tensors' device memory, the
reader maps it and copies device to device into memory of its own. No host memory, no network.

One fetch from one holder:
  1. export (a Ray call): the holder takes a lease on the chunks' tensors (K, V, summary; selected rows only, when
     asked), shares them through torch's CUDA tensor sharing (`reduce_tensor`: an IPC handle of the allocation,
     an offset, an event the reader waits on, a reference counter) and answers the handles with each tensor's
     dtype, shape and checksum, plus the chunks it no longer has.
  2. copy: the reader maps each handle, copies into buffers of its own (or the caller's, `alloc`), waits for the
     copies, unmaps, and checks every checksum where the KV landed.
  3. release (a Ray call, not waited for): the holder drops the lease.
While a lease is held the store may evict a chunk: the lease keeps its tensors alive. After the lease is gone,
torch's own IPC reference counter still keeps the memory from being reused while a reader has it mapped
(`CudaIPCSentData` limbo, freed by `torch.cuda.ipc_collect`). A lease the reader never releases expires after
`ttl_s`; if the reader's actor is dead by then, the holder also gives back the reader's reference counts, so the
memory of a reader that died with a chunk mapped is freed too (a live but slow reader keeps it mapped safely).

CUDA IPC needs both processes on the same physical GPU: `cluster/kv/kv_paths.py` chooses this path only then.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import ray
import torch
from pdllm.cluster.kv.chunk_store import ChunkStore
from pdllm.cluster.kv.collective_transport import announce, buffers_for, checksum, chunk_tensors
from pdllm.cluster.kv.transport import FetchItem, FetchResult, TransferError
from torch import Tensor

from pdllm.method.chunk_kv import ChunkKV

log = logging.getLogger(__name__)

# alloc(header) -> K, V, summary buffers on the reader's GPU of the announced dtypes/shapes, or None for new ones
Alloc = Callable[[dict], "list[Tensor] | None"]


class IpcUnavailable(TransferError):
    """The IPC path cannot be used with this holder (not on CUDA, refused, gone, or its handles do not open):
    the chunks should come another way (same-node read)."""


def ipc_supported(device: str) -> bool:
    """CUDA IPC needs a CUDA device in this process; on CPU the host paths are used."""
    return device == "cuda" and torch.cuda.is_available()


@dataclass
class Lease:
    reader: str
    tensors: list[Tensor]  # what the holder keeps alive for the reader
    counters: list[tuple[bytes, int]]  # torch's IPC reference counter (file handle, offset) per shared tensor
    at: float


@dataclass
class LeaseTable:
    """Leases by id, with expiry. Expired leases whose reader is dead are returned by `expire` so the holder can
    give back that reader's reference counts; expired leases of live readers are only dropped."""

    ttl_s: float
    clock: Callable[[], float] = time.monotonic
    leases: dict[str, Lease] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, lease_id: str, lease: Lease) -> None:
        with self._lock:
            self.leases[lease_id] = lease

    def release(self, lease_id: str) -> bool:
        with self._lock:
            return self.leases.pop(lease_id, None) is not None

    def expire(self, reader_dead: Callable[[str], bool]) -> list[Lease]:
        """Drop leases older than ttl_s; return those of readers that `reader_dead` says are gone."""
        now = self.clock()
        with self._lock:
            old = [lid for lid, lease in self.leases.items() if now - lease.at > self.ttl_s]
            dropped = [self.leases.pop(lid) for lid in old]
        return [lease for lease in dropped if reader_dead(lease.reader)]

    def __len__(self) -> int:
        return len(self.leases)


def actor_dead(name: str) -> bool:
    """True when Ray no longer knows a live actor of that name (killed, or its process died)."""
    try:
        ray.get_actor(name)
    except ValueError:
        return True
    return False


class IpcExporter:
    """The holder's side: leases chunk tensors to readers on the same GPU and shares their memory."""

    def __init__(
        self, store: ChunkStore, device: str, ttl_s: float = 60.0, verify: bool = True, reader_dead=actor_dead
    ) -> None:
        self.store, self.device, self.verify, self.reader_dead = store, device, verify, reader_dead
        self.leases = LeaseTable(ttl_s)
        self.exported_bytes = 0
        self.reclaimed = 0  # leases of dead readers whose reference counts were given back

    def export(self, lease_id: str, reader: str, requests: list[tuple[str, list[int]]]) -> dict:
        """{"headers": [...], "missing": [...]}, {"refused": why} when this holder has no CUDA, or {"error": why}
        for a bad request (nothing is leased then)."""
        if not ipc_supported(self.device):
            return {"refused": f"holder keeps chunk KV on {self.device}, not on a CUDA device"}
        self.sweep()
        found, missing = [], []
        for cid, rows in requests:  # check everything before sharing anything: a share needs a reader to open it
            chunk = self.store.get(cid)
            if chunk is None:
                missing.append(cid)
            elif rows and (min(rows) < 0 or max(rows) >= chunk.length):
                return {"error": f"rows out of range for chunk {cid[:12]} ({chunk.length} rows)"}
            else:
                found.append((chunk, rows or None))
        headers, tensors, counters = [], [], []
        for chunk, rows in found:
            parts = chunk_tensors(chunk, rows, "cuda")
            header = announce(chunk, rows, parts, self.verify)
            header["handles"] = [share(t) for t in parts]
            counters += [(h["ref_counter_handle"], h["ref_counter_offset"]) for h in header["handles"]]
            headers.append(header)
            tensors += parts
        if tensors:
            self.leases.add(lease_id, Lease(reader, tensors, counters, self.leases.clock()))
            self.exported_bytes += sum(t.numel() * t.element_size() for t in tensors)
        return {"headers": headers, "missing": missing}

    def release(self, lease_id: str) -> bool:
        """The reader is done copying: drop the lease (memory it still maps stays valid until it unmaps)."""
        found = self.leases.release(lease_id)
        self.sweep()
        return found

    def sweep(self) -> None:
        """Expire old leases; give back the reference counts of readers that died holding a mapping."""
        for lease in self.leases.expire(self.reader_dead):
            for handle, offset in lease.counters:
                unshare({"ref_counter_handle": handle, "ref_counter_offset": offset})
            self.reclaimed += 1
            log.warning("reader %s died with chunk KV mapped: its lease is reclaimed", lease.reader)
        if ipc_supported(self.device):
            torch.cuda.ipc_collect()  # free shared blocks no reader maps any more

    def status(self) -> dict:
        return {"ipc_leases": len(self.leases), "ipc_exported_bytes": self.exported_bytes,
                "ipc_reclaimed": self.reclaimed}  # fmt: skip


class IpcHolder:
    """Ray-callable exporter methods, mixed into the prefill worker (which sets `self.kv_exporter`)."""

    kv_exporter: IpcExporter

    def ipc_export(self, lease_id: str, reader: str, requests: list[tuple[str, list[int]]]) -> dict:
        return self.kv_exporter.export(lease_id, reader, requests)

    def ipc_release(self, lease_id: str) -> bool:
        return self.kv_exporter.release(lease_id)


def _rebuild_params() -> tuple[str, ...]:
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    return tuple(inspect.signature(rebuild_cuda_tensor).parameters)


_REBUILD_PARAMS = _rebuild_params()


def share(t: Tensor) -> dict:
    """torch's IPC description of a CUDA tensor (rebuild_cuda_tensor's arguments by name, classes left out)."""
    from torch.multiprocessing.reductions import reduce_tensor

    _, args = reduce_tensor(t)
    shared = dict(zip(_REBUILD_PARAMS, args, strict=True))
    shared["tensor_cls"] = shared["storage_cls"] = None  # the reader names its own
    return shared


def map_shared(shared: dict, device_index: int) -> Tensor:
    """The holder's tensor, mapped into this process on `device_index` (the same physical GPU)."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    args = {**shared, "tensor_cls": torch.Tensor, "storage_cls": torch.storage.TypedStorage}
    args["storage_device"] = device_index
    return rebuild_cuda_tensor(**args)


def unshare(shared: dict) -> None:
    """Give back the reference count of a share that will never be mapped (the holder can then free it)."""
    try:
        torch.UntypedStorage._release_ipc_counter_cuda(shared["ref_counter_handle"], shared["ref_counter_offset"])
    except Exception as e:  # the holder's counter file is gone with it
        log.warning("IPC counter not given back: %s: %s", type(e).__name__, e)


class IpcTransport:
    """The reader's side: fetches from holders on this process's GPU by export, map + copy, release."""

    def __init__(self, me: str, device: str = "cuda") -> None:
        self.me, self.device = me, device
        self.received_bytes = 0
        self._handles: dict[str, object] = {}
        self._lock = threading.Lock()

    def _handle(self, holder: str):
        with self._lock:
            if holder not in self._handles:
                self._handles[holder] = ray.get_actor(holder)
            return self._handles[holder]

    def fetch(self, holder: str, items: list[FetchItem], timeout_s: float, alloc: Alloc | None = None) -> FetchResult:
        """Chunks of `items` from `holder`; IpcUnavailable when this path cannot serve them, TransferError when
        the KV arrived wrong (checksum), so the caller may try again."""
        deadline = time.monotonic() + timeout_s
        lease_id, reply = self.announce(holder, items, deadline)
        try:
            return self.receive(reply, alloc)
        finally:
            if reply.get("headers"):
                try:
                    self._handle(holder).ipc_release.remote(lease_id)  # not waited for: the lease expires anyway
                except Exception as e:  # the holder is gone: its lease went with it
                    log.warning("releasing IPC lease at %s: %s", holder, e)

    def announce(self, holder: str, items: list[FetchItem], deadline: float) -> tuple[str, dict]:
        """Step 1: the holder leases and shares the items; (lease id, its reply)."""
        if not ipc_supported(self.device):
            raise IpcUnavailable(f"this reader keeps chunk KV on {self.device}: no CUDA IPC")
        lease_id = uuid.uuid4().hex
        requests = [(i.chunk_id, list(i.rows)) for i in items]
        try:
            ref = self._handle(holder).ipc_export.remote(lease_id, self.me, requests)
            reply = ray.get(ref, timeout=max(0.05, deadline - time.monotonic()))
        except Exception as e:  # ValueError (no such actor), RayActorError, GetTimeoutError
            raise IpcUnavailable(f"{holder} did not export over CUDA IPC: {type(e).__name__}: {e}") from e
        if "refused" in reply:
            raise IpcUnavailable(f"{holder} refused CUDA IPC: {reply['refused']}")
        if "error" in reply:
            raise TransferError(f"fetch from {holder}: {reply['error']}")
        return lease_id, reply

    def map(self, reply: dict) -> list[list[Tensor]]:
        """Open every announced handle (K, V, summary per chunk); IpcUnavailable if one does not open (the
        counts of the shares not opened are given back, so the holder can free them)."""
        index = torch.cuda.current_device()
        shares = [s for header in reply.get("headers", []) for s in header["handles"]]
        flat: list[Tensor] = []
        try:
            for s in shares:
                flat.append(map_shared(s, index))
        except Exception as e:  # cudaIpcOpenMemHandle failed: another GPU, or IPC not allowed here
            for s in shares[len(flat) :]:
                unshare(s)
            raise IpcUnavailable(f"a CUDA IPC handle did not open: {type(e).__name__}: {e}") from e
        return [flat[i : i + 3] for i in range(0, len(flat), 3)]

    def receive(self, reply: dict, alloc: Alloc | None = None, mapped: list[list[Tensor]] | None = None) -> FetchResult:
        """Steps 2 and 3 for an exported reply: map (unless `mapped` is given), copy into own buffers, unmap
        (`mapped` is emptied), verify."""
        result = FetchResult(missing=list(reply.get("missing", [])))
        headers = reply.get("headers", [])
        if not headers:
            return result
        mapped = mapped if mapped is not None else self.map(reply)
        try:
            landed = _copy_out(headers, mapped, alloc, self.device)
        finally:
            torch.cuda.current_stream().synchronize()  # no copy may still read a mapping when it goes
            mapped.clear()  # unmapped: the holder may free what its lease no longer keeps
        for header, bufs in zip(headers, landed, strict=True):
            wants = header.get("checksums") or [None] * 3
            for name, t, want in zip(("k", "v", "summary"), bufs, wants, strict=True):
                if want is not None and checksum(t) != want:
                    raise TransferError(f"chunk {header['chunk_id'][:12]} {name}: checksum mismatch over CUDA IPC")
            k, v, summary = bufs
            chunk = ChunkKV(header["chunk_id"], list(header["tokens"]), k, v, summary, header["has_bos"])
            result.chunks[chunk.chunk_id] = chunk
            result.bytes += chunk.nbytes()
        result.paths["ipc"] = len(result.chunks)
        self.received_bytes += result.bytes
        return result


def _copy_out(headers: list[dict], mapped: list[list[Tensor]], alloc: Alloc | None, device: str) -> list[list[Tensor]]:
    """Queue a copy of every mapped tensor into a buffer of the reader's (alloc's, or new ones)."""
    landed = []
    for header, sources in zip(headers, mapped, strict=True):
        try:
            bufs = (alloc(header) if alloc is not None else None) or buffers_for(header, device)
        except ValueError as e:
            raise TransferError(f"chunk {str(header.get('chunk_id'))[:12]}: malformed export: {e}") from e
        for dst, src in zip(bufs, sources, strict=True):
            if dst.shape != src.shape or dst.dtype != src.dtype:
                raise TransferError(f"chunk {header['chunk_id'][:12]}: buffer {dst.dtype} {list(dst.shape)} "
                                    f"for {src.dtype} {list(src.shape)}")  # fmt: skip
            dst.copy_(src, non_blocking=True)
        landed.append(bufs)
    return landed
