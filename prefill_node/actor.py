"""The prefill actor: encodes context chunks in batches, keeps their KV in its node's chunk store, registers them in
the Redis index, and serves them to decode actors over gRPC (ChunkTransfer) or, on the same node, through Ray.

Two requests needing the same missing chunk encode it once: a chunk is encoded only by whoever wins its claim
(Redis SET NX with expiry, all of a call's chunks in one script); the others report it as `waiting` and the router
waits for its index entry.
A chunk still in this store whose index entry was dropped (a reader could not fetch it) is registered again.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid

import ray
import torch
from pdllm.cluster.common.heap_trim import HeapTrim
from pdllm.cluster.common.limits import ClusterLimits
from pdllm.cluster.common.memory_guard import MemoryGuard
from pdllm.cluster.common.memory_limit import MemoryLimit
from pdllm.cluster.common.proc_stats import process_stats
from pdllm.cluster.kv.chunk_index import CLAIMED, INDEXED, WAITING, ChunkIndex, IndexEntry, entry_of
from pdllm.cluster.kv.chunk_store import ChunkStore
from pdllm.cluster.kv.collective_group import CollectiveGroup
from pdllm.cluster.kv.collective_transport import CollectiveHolder, CollectiveSender
from pdllm.cluster.kv.ipc_transport import IpcExporter, IpcHolder
from pdllm.cluster.kv.jobs import PrefillJob, PrefillResult
from pdllm.cluster.kv.transfer_server import TransferFault, serve

from pdllm.devices import gpu_cache_bytes, pick_device
from pdllm.errors import InvalidRequest
from pdllm.method import MethodConfig, encode_chunks
from pdllm.method.chunk_kv import ChunkKV
from pdllm.models.loader import load_model
from pdllm.observability import counters, metrics
from pdllm.observability.logs import configure_logging, request_context

log = logging.getLogger(__name__)

CPU_STORE_BYTES = 2 << 30


def derived_capacity(device: str, gpus: float = 1.0) -> int:
    """Store capacity when the config says 0: 90% of the GPU memory left after the weights, within the actor's
    share of the GPU (pdllm.devices); 2 GiB on CPU."""
    return gpu_cache_bytes(gpus) if device == "cuda" else CPU_STORE_BYTES


class PrefillWorker(CollectiveHolder, IpcHolder):  # + collective_*/ipc_* methods: KV over NCCL/gloo, CUDA IPC
    def __init__(
        self,
        name: str,
        model_dir: str,
        gpus: float,
        cpus: float,
        capacity_bytes: int,
        redis_url: str,
        limits: ClusterLimits,
        token: str,
    ) -> None:
        torch.set_num_threads(max(1, int(cpus)))
        configure_logging(json=limits.log_json, level=limits.log_level)
        self.name, self.limits = name, limits
        self.device = pick_device(gpus)
        self.lm = load_model(model_dir, self.device)
        self.kv_row_bytes = self.lm.spec.kv_bytes_per_token(self.lm.model.dtype.itemsize)  # one token's K/V, all layers
        self.index = ChunkIndex.from_url(redis_url, limits.index_prefix, limits.redis_timeout_s)
        # a restarted incarnation: the entries and claims of the one that died point at a store that is gone
        stale, claims = self.index.remove_holder(name), self.index.release_claims_of(name)
        if stale or claims:
            log.warning("%s restarted: removed %d index entries and %d claims of its previous incarnation", name,
                        stale, claims)  # fmt: skip
        self.node = ray.get_runtime_context().get_node_id()
        host = ray.util.get_node_ip_address()
        capacity = capacity_bytes or derived_capacity(self.device, gpus)
        self.store = ChunkStore(capacity, self.index, name, self.node, "")
        self.server, port = serve(self.store, host=host, token=token, piece_bytes=limits.transfer_piece_bytes)
        self.store.address = f"{host}:{port}"
        self.collective = CollectiveGroup()  # joined by the runtime when this actor can send KV device to device
        self.kv_sender = CollectiveSender(self.collective, self.store, ttl_s=limits.collective_timeout_s)
        self.kv_exporter = IpcExporter(self.store, self.device, ttl_s=limits.ipc_lease_s)  # same-GPU readers
        self._encode_lock = threading.Lock()
        self.encoded_total = 0
        self.inflight = 0
        self.memory = MemoryGuard.from_limits(limits)  # refuse prefills before a memory killer acts
        self.memory_limit = MemoryLimit.for_actor(  # past its hard limit the actor ends, its cause recorded
            "prefill", name, limits.actor_memory_limit_bytes, self.index.r, limits.index_prefix
        )
        self.heap = HeapTrim()  # freed heap back to the system after work: RSS that stays bounded

    def info(self) -> dict:
        spec = self.lm.spec
        return {
            "name": self.name,
            "node": self.node,
            "address": self.store.address,
            "model_id": self.lm.model_id,
            "max_position": spec.max_position,
            "device": self.device,
            "pid": os.getpid(),
            "family": spec.family,
            "vocab_size": spec.vocab_size,
            "num_layers": spec.num_layers,
            "hidden_size": spec.hidden_size,
        }

    def prefill(self, job: PrefillJob) -> PrefillResult:
        """Make every chunk of `job` available (its ids are the router's, not hashed again): chunks in this store are
        registered again if their entry was dropped, the rest are claimed in one index round trip and encoded by
        this actor where it won the claim. Returns the entries (to hand the decode actor without a read) and the
        ids another actor is encoding (`waiting`)."""
        self.memory.admit(f"prefill actor {self.name}")
        self.inflight += 1
        t0 = time.perf_counter()
        try:
            with request_context(job.request_id):
                out = self._prefill(job.chunks, job.method)
                log.info(
                    "prefill of %d chunks: %d encoded, %d present, %d waiting on another actor (%.1f ms)",
                    len(job.chunks), len(out.encoded), len(out.entries) - len(out.encoded), len(out.waiting),
                    1000 * (time.perf_counter() - t0),
                )  # fmt: skip
                return out
        finally:
            self.inflight -= 1
            self.heap.after_work()

    def _entry(self, chunk: ChunkKV) -> IndexEntry:
        """The entry this actor's store registered for `chunk` (as `ChunkIndex.register` wrote it)."""
        return entry_of(chunk, self.store.holder, self.store.node, self.store.address, time.time())

    def _prefill(self, todo: dict[str, list[int]], cfg: MethodConfig) -> PrefillResult:
        self._refuse_oversized(todo)
        out, unheld, held = PrefillResult(), [], []
        for cid in todo:
            chunk = self.store.get(cid)
            if chunk is not None:  # its entry was dropped after a failed fetch (or never read): register it again
                held.append(chunk)
                out.entries[cid] = self._entry(chunk)
            else:
                unheld.append(cid)
        evicted = self.store.put_all(held)
        owner = f"{self.name}:{uuid.uuid4().hex[:8]}"
        states = self.index.claim_all(unheld, owner, self.limits.claim_ttl_s)
        mine = {cid: todo[cid] for cid in unheld if states[cid] == CLAIMED}
        out.waiting = [cid for cid in unheld if states[cid] == WAITING]
        out.indexed_elsewhere = [cid for cid in unheld if states[cid] == INDEXED]
        try:
            if mine:
                with self._encode_lock:
                    fresh = encode_chunks(
                        self.lm, list(mine.values()), cfg, self.lm.model_id, self.limits.prefill_batch_size,
                        chunk_ids=list(mine),
                    )  # fmt: skip
                evicted += self.store.put_all(fresh)  # one index round trip for all of them
                out.entries.update((chunk.chunk_id, self._entry(chunk)) for chunk in fresh)
                self.encoded_total += len(fresh)
                metrics.record_prefill(sum(len(t) for t in mine.values()), len(fresh))
                out.encoded = list(mine)
        finally:
            self.index.release_all(list(mine), owner)
        self._check_fits(todo, evicted)
        return out

    def _refuse_oversized(self, todo: dict[str, list[int]]) -> None:
        """Before any claim or encode: a context whose KV rows alone (a lower bound: no BOS rows, no summaries)
        exceed this store can never be held, so encoding it would be work thrown away."""
        need = sum(len(tokens) for tokens in todo.values()) * self.kv_row_bytes
        if need > self.store.capacity_bytes:
            raise InvalidRequest(self._too_large(len(todo), f"their KV needs at least {need} bytes"))

    def _check_fits(self, todo: dict[str, list[int]], evicted: list[str]) -> None:
        """A document whose chunks do not fit this store evicts its own chunks while they are stored: say so now,
        rather than hand the router entries of KV that is gone (it would prefill and decode again, in vain)."""
        own = [cid for cid in evicted if cid in todo]
        if own:
            raise InvalidRequest(self._too_large(len(todo), f"storing them evicted {len(own)} of them"))

    def _too_large(self, chunks: int, why: str) -> str:
        return (
            f"the context's {chunks} chunks do not fit prefill actor {self.name}'s chunk store "
            f"({self.store.capacity_bytes} bytes; {why}): raise store_capacity_bytes in the cluster config "
            f"(pdllm serve/generate --store-bytes), or send a shorter context"
        )

    def read_chunks(self, cids: list[str]) -> dict[str, ChunkKV]:
        """Same-node reads (through Ray's shared-memory object store, no network); absent ids are left out."""
        out = {}
        for cid in cids:
            chunk = self.store.get(cid)
            if chunk is not None:
                out[cid] = _to_cpu(chunk)
        return out

    def status(self) -> dict:
        service = self.server.service
        return {
            "name": self.name,
            "node": self.node,
            "pid": os.getpid(),
            "address": self.store.address,
            "inflight": self.inflight,
            "running": self.inflight,
            "encoded_total": self.encoded_total,
            "served_bytes": service.served_bytes,
            "transfer_streams": service.active_streams,  # fetches in progress: KV held for readers
            "collective_pinned": len(self.kv_sender._pinned),  # announced collective transfers not yet sent
            "faults_fired": service.faults_fired,
            **self.kv_exporter.status(),  # CUDA IPC leases held for readers on this GPU
            "process": process_stats(),
            **self.memory.status(),
            **self.memory_limit.status(),
            **self.heap.status(),
            "metrics": metrics.snapshot(),
            "counters": counters.snapshot(),  # index round trips, hashes: what requests cost here
            **self.store.usage(),
        }

    def set_memory_budget(self, budget_bytes: int) -> None:
        """Change this actor's RSS budget (drills, reliability tests; 0: off)."""
        self.memory.set_budget(budget_bytes)

    def hold_memory(self, nbytes: int) -> None:
        """Drill: keep `nbytes` more of written memory (a leak on demand): the memory limit then ends the actor."""
        self.memory_limit.hold(nbytes)

    def inject_transfer_fault(self, kind: str, count: int = 1, after_pieces: int = 1, stall_s: float = 5.0) -> None:
        """Break this holder's next `count` KV fetches on the real gRPC stream (drills, reliability tests):
        truncate | abort | corrupt | stall (see cluster/kv/transfer_server.py)."""
        self.server.service.inject(TransferFault(kind, count, after_pieces, stall_s))

    def stop(self) -> None:
        """Stop serving and take this store's chunks out of the index."""
        self.server.stop(grace=1.0)
        self.store.clear()


def _to_cpu(chunk: ChunkKV) -> ChunkKV:
    if chunk.k.device.type == "cpu":
        return chunk
    return ChunkKV(chunk.chunk_id, chunk.tokens, chunk.k.cpu(), chunk.v.cpu(), chunk.summary.cpu(), chunk.has_bos)
