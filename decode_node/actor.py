"""The decode actor: takes a job (question tokens + the document's chunk ids), ranks the chunks from their index
summaries, gets the top-K chunks' KV (its own cache first, then the holder: through Ray on the same node, over the
KVTransport between nodes), and runs the denoising loop. Several jobs run at once (bounded by the actor's
max_concurrency); a selected chunk that vanished (evicted) is reported back so the router re-prefills it.
"""

from __future__ import annotations

import threading
import time

import ray
import torch
from pdllm.cluster.chunk_index import ChunkIndex, IndexEntry
from pdllm.cluster.collective_group import CollectiveGroup, CollectiveMember
from pdllm.cluster.collective_transport import CollectiveTransport
from pdllm.cluster.limits import ClusterLimits
from pdllm.cluster.transport import FetchItem, GrpcTransport, KVTransport
from pdllm.prefill_node.actor import pick_device

from pdllm.method import ChunkCache, MethodConfig, decode_with_chunks, rank_chunks
from pdllm.method.chunk_kv import ChunkKV
from pdllm.models.loader import load_model
from pdllm.sampler import SamplerConfig, strip_after_eos


class DecodeWorker(CollectiveMember):  # + collective_* methods: joins the KV group (cluster/collective_group.py)
    def __init__(
        self,
        name: str,
        model_dir: str,
        gpus: float,
        cpus: float,
        redis_url: str,
        limits: ClusterLimits,
        token: str,
        transport: KVTransport | None = None,
    ) -> None:
        torch.set_num_threads(max(1, int(cpus)))
        self.name, self.limits = name, limits
        self.device = pick_device(gpus)
        self.lm = load_model(model_dir, self.device)
        self.index = ChunkIndex.from_url(redis_url, limits.index_prefix, limits.redis_timeout_s)
        self.node = ray.get_runtime_context().get_node_id()
        self.collective = CollectiveGroup()  # joined by the runtime when a holder can send KV device to device
        grpc_transport = GrpcTransport(token=token, piece_bytes=limits.transfer_piece_bytes)
        self.transport = transport or CollectiveTransport(self.collective, grpc_transport, self.device)
        self.cache = ChunkCache(max_bytes=limits.decode_cache_bytes)  # fetched KV, LRU, for later jobs
        self._cache_lock = threading.Lock()
        self._count_lock = threading.Lock()
        self.running = 0
        self.done = 0

    def info(self) -> dict:
        return {"name": self.name, "node": self.node, "device": self.device, "model_id": self.lm.model_id}

    def decode(self, job: dict) -> dict:
        """job: question_ids, chunk_ids (document order), method (MethodConfig fields), sampler (SamplerConfig
        fields), seed. Returns {"tokens", "answer", "stats"} or {"missing": [chunk ids whose KV is gone]}."""
        with self._count_lock:
            self.running += 1
        try:
            return self._decode(job)
        finally:
            with self._count_lock:
                self.running -= 1
                self.done += 1

    def _decode(self, job: dict) -> dict:
        t0 = time.perf_counter()
        cfg, sampler = MethodConfig(**job["method"]), SamplerConfig(**job["sampler"])
        question_ids, ids = job["question_ids"], job["chunk_ids"]
        entries = self.index.lookup(sorted(set(ids)))
        gone = sorted({c for c in ids if c not in entries})
        if gone:
            return {"missing": gone}
        picked = rank_chunks(self.lm, question_ids, [entries[c].summary for c in ids], cfg.top_k) if ids else []
        t1 = time.perf_counter()
        need = list(dict.fromkeys(ids[i] for i in picked))
        got, where = self._gather(need, entries)
        gone = [c for c in need if c not in got]
        if gone:
            for cid in gone:  # the holder no longer has it: drop the stale entry so it is re-prefilled
                self.index.remove(cid, entries[cid].holder)
            return {"missing": gone}
        self.index.touch(need)
        t2 = time.perf_counter()
        device = self.lm.model.device
        chunks = [_on(got[ids[i]], device) for i in picked]
        result = decode_with_chunks(self.lm, question_ids, chunks, cfg, sampler, seed=job.get("seed", 0))
        spec = self.lm.spec
        tokens = strip_after_eos(result.tokens, spec.eos_token_ids, spec.mask_token_id)
        stats = {
            **result.stats,
            "selected_chunk_indices": picked,
            "fetched_local_cache": where["cache"],
            "fetched_same_node": where["node"],
            "fetched_remote": where["remote"],
            "fetched_bytes": where["bytes"],
            "fetched_paths": where["paths"],
            "rank_ms": round(1000 * (t1 - t0), 3),
            "fetch_ms": round(1000 * (t2 - t1), 3),
            "decode_actor": self.name,
        }
        return {"tokens": tokens, "answer": self.lm.tokenizer.decode(tokens), "stats": stats}

    def _gather(self, need: list[str], entries: dict[str, IndexEntry]) -> tuple[dict[str, ChunkKV], dict]:
        """KV of `need`: own cache, then same-node holders through Ray, then the transport."""
        got, where = {}, {"cache": 0, "node": 0, "remote": 0, "bytes": 0, "paths": {}}
        with self._cache_lock:
            for cid in need:
                if (chunk := self.cache.get(cid)) is not None:
                    got[cid] = chunk
        where["cache"] = len(got)
        local: dict[str, list[str]] = {}
        remote = []
        for cid in need:
            if cid in got:
                continue
            entry = entries[cid]
            if entry.node == self.node and not self.transport.serves_directly(entry.address):
                local.setdefault(entry.holder, []).append(cid)
            else:
                remote.append(FetchItem(cid, entry.address))
        for holder, cids in local.items():
            try:
                actor = ray.get_actor(holder)
                found = ray.get(actor.read_chunks.remote(cids), timeout=self.limits.call_timeout_s)
            except (ValueError, ray.exceptions.RayActorError):
                found = {}  # the holder died: its chunks count as missing
            got.update(found)
            where["node"] += len(found)
            where["bytes"] += sum(c.nbytes() for c in found.values())
        if remote:
            fetched = self.transport.fetch(remote, timeout_s=self.limits.call_timeout_s)
            got.update(fetched.chunks)
            where["remote"] += len(fetched.chunks)
            where["bytes"] += fetched.bytes
            where["paths"] = fetched.paths
        with self._cache_lock:
            for chunk in got.values():
                self.cache.put(chunk)
        return got, where

    def status(self) -> dict:
        return {
            "name": self.name,
            "node": self.node,
            "running": self.running,
            "done": self.done,
            "cache_chunks": len(self.cache),
            "cache_bytes": self.cache.bytes,
        }


def _on(chunk: ChunkKV, device: torch.device) -> ChunkKV:
    if chunk.k.device == device:
        return chunk
    k, v, s = chunk.k.to(device), chunk.v.to(device), chunk.summary.to(device)
    return ChunkKV(chunk.chunk_id, chunk.tokens, k, v, s, chunk.has_bos)
