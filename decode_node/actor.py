"""The decode actor: takes a job (question tokens + the document's chunk ids), ranks the chunks from their index
summaries, gets the top-K chunks' KV (its own cache first, then the holder: through Ray on the same node, over the
KVTransport between nodes), and runs the denoising loop. Several jobs run at once (bounded by the actor's
max_concurrency); a selected chunk that vanished (evicted) is reported back so the router re-prefills it.

`decode_stream` is the same job as a Ray streaming generator: progress events (one per denoising step, through a
bounded box that drops old steps rather than stall the decode) and then the result. `cancel(request_id)` stops a
job at its next step. A fetch that fails (stream broken, timed out, checksum mismatch) is tried again
(`fetch_retries`); if the holder still fails, its chunks are reported missing and their index entries dropped, so the
router prefills them again on another actor.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter

import ray
import torch
from pdllm.cluster.chunk_index import ChunkIndex, IndexEntry
from pdllm.cluster.collective_group import CollectiveGroup, CollectiveMember
from pdllm.cluster.collective_transport import CollectiveTransport
from pdllm.cluster.event_box import EventBox
from pdllm.cluster.limits import ClusterLimits
from pdllm.cluster.proc_stats import process_stats
from pdllm.cluster.transport import FetchItem, GrpcTransport, KVTransport, TransferError
from pdllm.prefill_node.actor import pick_device

from pdllm.errors import PdllmError
from pdllm.method import ChunkCache, MethodConfig, decode_with_chunks, rank_chunks
from pdllm.method.chunk_kv import ChunkKV
from pdllm.method.instruction import instruction_kv
from pdllm.method.joint import decode_joint
from pdllm.method.ranking import rank
from pdllm.models.loader import load_model
from pdllm.observability import metrics
from pdllm.observability.logs import configure_logging, request_context
from pdllm.sampler import SamplerConfig, strip_after_eos

log = logging.getLogger(__name__)
CANCEL_MEMORY_S = 600.0  # how long a cancelled request id is remembered (a cancel may arrive before its job)


class JobCancelled(PdllmError):
    """The router cancelled the job (its caller left or its deadline passed)."""


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
        configure_logging(json=limits.log_json, level=limits.log_level)
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
        self.cancelled = 0
        self._cancel_at: dict[str, float] = {}  # job id -> when its cancel arrived
        self.fetch_failures: Counter = Counter()  # failed fetch attempts by reason
        self.fetch_recovered = 0  # fetches that failed and then succeeded on a retry

    def info(self) -> dict:
        return {
            "name": self.name,
            "node": self.node,
            "device": self.device,
            "model_id": self.lm.model_id,
            "pid": os.getpid(),
        }

    def cancel(self, job_id: str) -> None:
        """Stop the job `job_id` (job["job_id"], unique per decode call) at its next step, or before it starts."""
        now = time.monotonic()
        with self._count_lock:
            self._cancel_at[job_id] = now
            for rid in [r for r, t in self._cancel_at.items() if now - t > CANCEL_MEMORY_S]:
                del self._cancel_at[rid]

    def _is_cancelled(self, job_id: str | None) -> bool:
        return job_id is not None and job_id in self._cancel_at

    def decode_stream(self, job: dict):
        """The job as a stream: {"type": "step", ...} events when job["stream"] is set, then exactly one of
        {"type": "result", **decode's answer} or {"type": "cancelled"}. Errors propagate as the task's error."""
        jid = job.get("job_id")
        box = EventBox(self.limits.stream_events)

        def run() -> None:
            try:
                box.put_final({"type": "result", **self.decode(job, box if job.get("stream") else None)})
            except JobCancelled:
                box.put_final({"type": "cancelled"})
            except BaseException as e:  # re-raised in the generator: the router sees the task's error
                box.put_final(e)

        worker = threading.Thread(target=run, name=f"decode-{(jid or 'job')[:8]}", daemon=True)
        worker.start()
        finished = False
        try:
            while True:
                item = box.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                if item.get("type") in ("result", "cancelled"):
                    finished = True
                yield item
                if finished:
                    return
        finally:
            if not finished and jid is not None:  # the consumer went away (ray.cancel): stop the worker too
                self.cancel(jid)

    def decode(self, job: dict, events: EventBox | None = None) -> dict:
        """job: question_ids, chunk_ids (document order), method (MethodConfig fields), sampler (SamplerConfig
        fields), seed, and optionally job_id (cancel), request_id (logs) and total_steps (events). Returns {"tokens",
        "answer", "stats"} or {"missing": [chunk ids whose KV is gone], "holders": {holder: why}}."""
        with self._count_lock:
            self.running += 1
        try:
            with request_context(job.get("request_id")):
                return self._decode(job, events)
        except JobCancelled:
            with self._count_lock:
                self.cancelled += 1
            raise
        finally:
            with self._count_lock:
                self.running -= 1
                self.done += 1

    def _on_step(self, job: dict, events: EventBox | None):
        """The denoising loop's callback: stop if cancelled, record the step, hand a progress event to `events`."""
        jid, spec, last = job.get("job_id"), self.lm.spec, [time.perf_counter()]

        def on_step(step: int, gen) -> None:
            if self._is_cancelled(jid):
                raise JobCancelled(f"job {jid} cancelled at step {step}")
            now = time.perf_counter()
            metrics.record_step(now - last[0])
            last[0] = now
            if events is not None:
                row = gen[0].tolist()
                tokens = strip_after_eos(row, spec.eos_token_ids, spec.mask_token_id)
                event = {
                    "type": "step",
                    "step": step,
                    "total_steps": int(job.get("total_steps", 0)),
                    "partial_text": self.lm.tokenizer.decode(tokens),
                    "unmasked_tokens": sum(t != spec.mask_token_id for t in row),
                }
                events.put_step(event)

        return on_step

    def _decode(self, job: dict, events: EventBox | None = None) -> dict:
        t0 = time.perf_counter()
        if self._is_cancelled(job.get("job_id")):
            raise JobCancelled(f"job {job.get('job_id')} cancelled before it started")
        cfg, sampler = MethodConfig(**job["method"]), SamplerConfig(**job["sampler"])
        question_ids, ids = job["question_ids"], job["chunk_ids"]
        entries = self.index.lookup(sorted(set(ids)))
        gone = sorted({c for c in ids if c not in entries})
        if gone:
            return {"missing": gone, "holders": {}}
        draft = cfg.scoring == "draft"  # ranks over every chunk's KV, not the index's summaries
        summaries = [entries[c].summary for c in ids]
        picked = rank_chunks(self.lm, question_ids, summaries, cfg.top_k) if ids and not draft else []
        t1 = time.perf_counter()
        need = list(dict.fromkeys(ids if draft else [ids[i] for i in picked]))
        got, where = self._gather(need, entries)
        gone = [c for c in need if c not in got]
        if gone:
            holders = {}
            for cid in gone:  # the holder no longer has it, or cannot send it: drop the entry so it is re-prefilled
                holder = entries[cid].holder
                self.index.remove(cid, holder)
                holders[holder] = where["failed"].get(holder, "missing")
            return {"missing": gone, "holders": holders}
        self.index.touch(need)
        t2 = time.perf_counter()
        device = self.lm.model.device
        instruction_ids = job.get("instruction_ids") or []
        with self._cache_lock:
            instruction = instruction_kv(self.lm, instruction_ids, self.cache, self.lm.model_id)
        if draft and ids:
            picked, _ = rank(self.lm, question_ids, [_on(got[c], device) for c in ids], cfg, instruction)
        chunks = [_on(got[ids[i]], device) for i in picked]
        on_step = self._on_step(job, events)
        seed = job.get("seed", 0)
        if cfg.selected_kv == "joint":  # from the fetched chunks' tokens
            tokens = [c.tokens for c in chunks]
            result = decode_joint(self.lm, question_ids, tokens, cfg, sampler, instruction_ids, seed, on_step)
        else:
            result = decode_with_chunks(self.lm, question_ids, chunks, cfg, sampler, seed, on_step, instruction)
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
            "fetch_failures": where["errors"],
            "rank_ms": round(1000 * (t1 - t0), 3),
            "fetch_ms": round(1000 * (t2 - t1), 3),
            "decode_actor": self.name,
        }
        log.info(
            "decoded %d tokens in %d steps over %d of %d chunks (rank %.1f ms, fetch %.1f ms, total %.1f ms)",
            len(tokens), result.steps, len(picked), len(ids), stats["rank_ms"], stats["fetch_ms"],
            1000 * (time.perf_counter() - t0),
        )  # fmt: skip
        return {"tokens": tokens, "answer": self.lm.tokenizer.decode(tokens), "stats": stats}

    def _gather(self, need: list[str], entries: dict[str, IndexEntry]) -> tuple[dict[str, ChunkKV], dict]:
        """KV of `need`: own cache, then same-node holders through Ray, then the transport (per holder, so one
        failing holder costs only its own chunks). where["failed"]: holder -> why its chunks could not be had."""
        got = {}
        where = {"cache": 0, "node": 0, "remote": 0, "bytes": 0, "paths": {}, "failed": {}, "errors": []}
        with self._cache_lock:
            for cid in need:
                if (chunk := self.cache.get(cid)) is not None:
                    got[cid] = chunk
        where["cache"] = len(got)
        local: dict[str, list[str]] = {}
        remote: dict[str, list[FetchItem]] = {}
        holder_at: dict[str, str] = {}
        for cid in need:
            if cid in got:
                continue
            entry = entries[cid]
            if entry.node == self.node and not self.transport.serves_directly(entry.address):
                local.setdefault(entry.holder, []).append(cid)
            else:
                remote.setdefault(entry.address, []).append(FetchItem(cid, entry.address))
                holder_at[entry.address] = entry.holder
        for holder, cids in local.items():
            try:
                actor = ray.get_actor(holder)
                found = ray.get(actor.read_chunks.remote(cids), timeout=self.limits.fetch_timeout_s)
            except (ValueError, ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
                found = {}  # the holder died or hangs: its chunks count as missing
                where["failed"][holder] = f"same-node read failed: {type(e).__name__}"
            got.update(found)
            where["node"] += len(found)
            nbytes = sum(c.nbytes() for c in found.values())
            where["bytes"] += nbytes
            if found:
                metrics.record_fetch("local", nbytes)
        for address, items in remote.items():
            fetched = self._fetch(address, items, where)
            if fetched is None:
                where["failed"][holder_at[address]] = where["errors"][-1]
                continue
            got.update(fetched.chunks)
            where["remote"] += len(fetched.chunks)
            where["bytes"] += fetched.bytes
            for path, n in fetched.paths.items():
                where["paths"][path] = where["paths"].get(path, 0) + n
                if path in metrics.TRANSPORTS:
                    metrics.record_fetch(path, fetched.bytes * n // max(1, len(fetched.chunks)))
        with self._cache_lock:
            for chunk in got.values():
                self.cache.put(chunk)
        return got, where

    def _fetch(self, address: str, items: list[FetchItem], where: dict):
        """One holder's chunks through the transport, tried 1 + fetch_retries times; None if every try failed
        (the reasons are appended to where["errors"])."""
        for attempt in range(self.limits.fetch_retries + 1):
            try:
                fetched = self.transport.fetch(items, timeout_s=self.limits.fetch_timeout_s)
            except TransferError as e:
                reason = str(e)
                where["errors"].append(reason)
                with self._count_lock:
                    self.fetch_failures[_failure_kind(reason)] += 1
                log.warning("fetch of %d chunks from %s failed (try %d): %s", len(items), address, attempt + 1, e)
                continue
            if attempt:
                with self._count_lock:
                    self.fetch_recovered += 1
            return fetched
        return None

    def status(self) -> dict:
        with self._count_lock:
            cancels = len(self._cancel_at)
            failures = dict(self.fetch_failures)
        return {
            "name": self.name,
            "node": self.node,
            "pid": os.getpid(),
            "running": self.running,
            "done": self.done,
            "cancelled": self.cancelled,
            "cancels_remembered": cancels,
            "fetch_failures": failures,
            "fetch_recovered": self.fetch_recovered,
            "cache_chunks": len(self.cache),
            "cache_bytes": self.cache.bytes,
            "process": process_stats(),
            "metrics": metrics.snapshot(),
        }


def _failure_kind(reason: str) -> str:
    """A short label for a fetch failure (status counters)."""
    for needle, kind in (("checksum", "checksum"), ("DEADLINE", "deadline"), ("middle of a chunk", "truncated")):
        if needle in reason:
            return kind
    return "error"


def _on(chunk: ChunkKV, device: torch.device) -> ChunkKV:
    if chunk.k.device == device:
        return chunk
    k, v, s = chunk.k.to(device), chunk.v.to(device), chunk.summary.to(device)
    return ChunkKV(chunk.chunk_id, chunk.tokens, k, v, s, chunk.has_bos)
