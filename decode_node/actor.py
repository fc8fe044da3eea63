"""The decode actor: takes a job (question tokens + the document's chunk ids), ranks the chunks from their index
summaries (read once per chunk and kept on the device), pins the top-K chunks in its decode engine's resident KV
pool (fetching those not resident from their holder: CUDA IPC on the same GPU, through Ray on the same node, over
the KVTransport between nodes), and submits the job to the engine, which batches every running job into each
denoising step (pdllm.decode_node.engine). Each call runs in its own thread (up to the actor's max_concurrency) and
waits on its job; a selected chunk that vanished (evicted) is reported back so the router re-prefills it.

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
import uuid
from collections import Counter
from dataclasses import replace

import ray
import torch
from pdllm.cluster.common.event_box import EventBox
from pdllm.cluster.common.heap_trim import HeapTrim
from pdllm.cluster.common.limits import ClusterLimits
from pdllm.cluster.common.memory_guard import MemoryGuard
from pdllm.cluster.common.memory_limit import MemoryLimit
from pdllm.cluster.common.proc_stats import process_stats
from pdllm.cluster.kv.chunk_index import ChunkIndex, IndexEntry
from pdllm.cluster.kv.collective_group import CollectiveGroup, CollectiveMember
from pdllm.cluster.kv.collective_transport import CollectiveTransport
from pdllm.cluster.kv.jobs import ChunksMissing, DecodeResult, DecodeTask, StepEvent, StreamCancelled
from pdllm.cluster.kv.kv_paths import NODE, HolderFetch, KVPaths
from pdllm.cluster.kv.transport import FetchResult, GrpcTransport, KVTransport, TransferError
from pdllm.decode_node.engine import DecodeEngine, EngineConfig, MissingChunks, instruction_first
from pdllm.decode_node.job import JobCancelled, JobHandle
from pdllm.decode_node.summaries import SummaryCache

from pdllm.devices import pick_device
from pdllm.method import ChunkCache
from pdllm.method.chunk_kv import ChunkKV
from pdllm.method.instruction import instruction_kv
from pdllm.method.joint import decode_joint
from pdllm.method.ranking import rank
from pdllm.models.loader import load_model
from pdllm.observability import counters, metrics
from pdllm.observability.logs import configure_logging, request_context
from pdllm.sampler import strip_after_eos

log = logging.getLogger(__name__)
CANCEL_MEMORY_S = 600.0  # how long a cancelled request id is remembered (a cancel may arrive before its job)


class DecodeWorker(CollectiveMember):  # + collective_* methods: joins the KV group (cluster/kv/collective_group.py)
    def __init__(
        self,
        name: str,
        model_dir: str,
        gpus: float,
        cpus: float,
        redis_url: str,
        limits: ClusterLimits,
        token: str,
        engine: EngineConfig | None = None,
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
        self.kv_paths = KVPaths.for_actor(  # the path per holder: IPC on this GPU, NCCL, same-node read, gRPC
            name, self.node, self.device, self.transport, limits.same_gpu_ipc, probe_timeout_s=limits.probe_timeout_s
        )
        engine = replace(engine or EngineConfig(), gpu_fraction=min(1.0, gpus)) if gpus > 0 else engine
        self.engine = DecodeEngine(self.lm, engine)  # resident KV pool + batched steps, for every job
        self._handles: dict[str, JobHandle] = {}  # job id -> its engine job, while it runs
        self.summaries = SummaryCache(self.lm.model.device)  # chunk summaries read from the index once
        self.instructions = ChunkCache(max_bytes=64 << 20)  # instruction KV by content (computed here, kept whole)
        self._count_lock = threading.Lock()
        self.running = 0
        self.done = 0
        self.cancelled = 0
        self._cancel_at: dict[str, float] = {}  # job id -> when its cancel arrived
        self.fetch_failures: Counter = Counter()  # failed fetch attempts by reason
        self.fetch_recovered = 0  # fetches that failed and then succeeded on a retry
        self.memory = MemoryGuard.from_limits(limits)  # refuse jobs before a memory killer acts
        self.memory_limit = MemoryLimit.for_actor(  # past its hard limit the actor ends, its cause recorded
            "decode", name, limits.actor_memory_limit_bytes, self.index.r, limits.index_prefix
        )
        self.heap = HeapTrim()  # freed heap back to the system after work: RSS that stays bounded

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
            handle = self._handles.get(job_id)
            for rid in [r for r, t in self._cancel_at.items() if now - t > CANCEL_MEMORY_S]:
                del self._cancel_at[rid]
        if handle is not None:
            handle.cancel()  # dropped at the engine's next step boundary, queued or running

    def _is_cancelled(self, job_id: str | None) -> bool:
        return job_id is not None and job_id in self._cancel_at

    def decode_stream(self, job: DecodeTask):
        """The job as a stream: a StepEvent per step when `job.stream` is set, then exactly one of decode's answer
        (DecodeResult or ChunksMissing) or StreamCancelled. Errors propagate as the task's error."""
        jid = job.job_id
        box = EventBox(self.limits.stream_events)

        def run() -> None:
            try:
                box.put_final(self.decode(job, box if job.stream else None))
            except JobCancelled:
                box.put_final(StreamCancelled(jid))
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
                if not isinstance(item, dict):  # the answer (the step events are the engine's dicts)
                    finished = True
                yield self._step_event(item, job) if isinstance(item, dict) else item
                if finished:
                    return
        finally:
            if not finished and jid is not None:  # the consumer went away (ray.cancel): stop the worker too
                self.cancel(jid)

    def _step_event(self, item: dict, job: DecodeTask) -> StepEvent:
        spec, row = self.lm.spec, item["row"]
        tokens = strip_after_eos(row, spec.eos_token_ids, spec.mask_token_id)
        return StepEvent(
            step=item["step"],
            total_steps=job.total_steps,
            partial_text=self.lm.tokenizer.decode(tokens),
            unmasked_tokens=sum(t != spec.mask_token_id for t in row),
        )

    def decode(self, job: DecodeTask, events: EventBox | None = None) -> DecodeResult | ChunksMissing:
        """Rank the job's chunks from the entries it carries, fetch the selected KV from their holders, denoise.
        Returns the answer, or the chunks whose KV could not be had (ChunksMissing)."""
        with self._count_lock:
            self.running += 1
        try:
            with request_context(job.request_id):
                return self._decode(job, events)
        except JobCancelled:
            with self._count_lock:
                self.cancelled += 1
            raise
        finally:
            with self._count_lock:
                self.running -= 1
                self.done += 1
            self.heap.after_work()

    def _on_step(self, job: DecodeTask, events: EventBox | None):
        """The denoising loop's callback: stop if cancelled, record the step, hand a progress event to `events`."""
        jid, last = job.job_id, [time.perf_counter()]

        def on_step(step: int, gen) -> None:
            if self._is_cancelled(jid):
                raise JobCancelled(f"job {jid} cancelled at step {step}")
            now = time.perf_counter()
            metrics.record_step(now - last[0])
            last[0] = now
            if events is not None:  # the tokens only: the stream's reader makes the text, off the engine's thread
                events.put_step({"type": "step", "step": step, "row": gen[0].tolist()})

        return on_step

    def _decode(self, job: DecodeTask, events: EventBox | None = None) -> DecodeResult | ChunksMissing:
        t0 = time.perf_counter()
        if self._is_cancelled(job.job_id):
            raise JobCancelled(f"job {job.job_id} cancelled before it started")
        self.memory.admit(f"decode actor {self.name}")
        cfg, sampler = job.method, job.sampler
        question_ids, ids, entries = job.question_ids, job.chunk_ids, job.entries  # entries: the router's read
        gone = sorted({c for c in ids if c not in entries})
        if gone:
            return ChunksMissing(gone, {})
        if cfg.scoring != "draft" and ids:  # summaries: kept here, or carried by the entries a prefill just wrote
            summaries = self.summaries.get(list(entries), lambda cids: self._read_summaries(cids, entries))
            if gone := sorted({c for c in ids if c not in summaries}):  # dropped from the index meanwhile
                return ChunksMissing(gone, {})
        t_lookup = time.perf_counter()
        where, device, gpu = _where(), self.lm.model.device, self.engine.scheduler.gpu_lock
        instruction_ids = job.instruction_ids
        with self._count_lock:
            instruction = instruction_kv(self.lm, instruction_ids, self.instructions, self.lm.model_id)
        held: dict[str, ChunkKV] = {}  # KV fetched outside the pool (draft ranking reads every chunk's)
        if cfg.scoring == "draft" and ids:  # ranks over every chunk's KV, not the index's summaries
            held = self._gather(list(dict.fromkeys(ids)), entries, where)
            if missing := [c for c in dict.fromkeys(ids) if c not in held]:
                return self._missing(missing, entries, where)
            with gpu:
                picked, _ = rank(self.lm, question_ids, [_on(held[c], device) for c in ids], cfg, instruction)
        else:
            picked = self.engine.rank_chunks(question_ids, [summaries[c] for c in ids], cfg.top_k) if ids else []
        t1 = time.perf_counter()
        need = list(dict.fromkeys(ids[i] for i in picked))

        def fetch(missing: list[str]) -> dict[str, ChunkKV]:
            got = {c: held[c] for c in missing if c in held}
            if instruction is not None and instruction.chunk_id in missing:
                got[instruction.chunk_id] = instruction
            return {**got, **self._gather([c for c in missing if c not in got], entries, where)}

        seed, on_step = job.seed, self._on_step(job, events)
        if cfg.selected_kv == "joint":  # re-encoded from the fetched chunks' tokens, one request at a time
            got = fetch(need)
            if missing := [c for c in need if c not in got]:
                return self._missing(missing, entries, where)
            self.index.touch(need)
            t2 = time.perf_counter()
            with gpu:
                tokens = [got[ids[i]].tokens for i in picked]
                result = decode_joint(self.lm, question_ids, tokens, cfg, sampler, instruction_ids, seed, on_step)
            n_sel, start = result.stats.get("selected_tokens", 0), 0
        else:
            cids, whole = instruction_first(need, instruction)
            jid = job.job_id or uuid.uuid4().hex
            try:
                djob = self.engine.prepare(
                    question_ids, cids, fetch, cfg, sampler, seed, on_step, timeout_s=self.limits.call_timeout_s,
                    job_id=jid, whole=whole,
                )  # fmt: skip
            except MissingChunks as e:
                return self._missing(e.cids, entries, where)
            self.index.touch(need)
            t2 = time.perf_counter()
            n_sel, start = int(djob.sel_rows.shape[-1]), djob.start
            with self._count_lock:
                handle = self.engine.submit(djob)
                self._handles[jid] = handle
            if self._is_cancelled(jid):
                handle.cancel()
            try:
                result = handle.wait()
            finally:
                with self._count_lock:
                    self._handles.pop(jid, None)
        spec = self.lm.spec
        tokens = strip_after_eos(result.tokens, spec.eos_token_ids, spec.mask_token_id)
        stats = {
            **result.stats,
            "selected_chunks": len(picked),
            "selected_tokens": n_sel,
            "instruction_tokens": len(instruction_ids),
            "question_start_position": start,
            "kv_tokens_per_step": n_sel + len(question_ids) + sampler.gen_length,
            "selected_chunk_indices": picked,
            "scoring": cfg.scoring,
            "selected_kv": cfg.selected_kv,
            "chunking": cfg.chunking,
            "fetched_local_cache": len(need) - where["node"] - where["remote"],
            "fetched_same_node": where["node"],
            "fetched_remote": where["remote"],
            "fetched_bytes": where["bytes"],
            "fetched_paths": where["paths"],
            "fetch_failures": where["errors"],
            "lookup_ms": round(1000 * (t_lookup - t0), 3),  # the index read (holders and summaries)
            "rank_ms": round(1000 * (t1 - t0), 3),  # lookup + ranking
            "fetch_ms": round(1000 * (t2 - t1), 3),
            "actor_ms": round(1000 * (time.perf_counter() - t0), 3),  # the whole job on this actor
            "decode_actor": self.name,
        }
        log.info(
            "decoded %d tokens in %d steps (mean batch %.1f) over %d of %d chunks (rank %.1f ms, fetch %.1f ms, "
            "total %.1f ms)", len(tokens), result.steps, result.stats.get("mean_batch", 1.0), len(picked), len(ids),
            stats["rank_ms"], stats["fetch_ms"], 1000 * (time.perf_counter() - t0),
        )  # fmt: skip
        return DecodeResult(tokens, self.lm.tokenizer.decode(tokens), stats)

    def _read_summaries(self, cids: list[str], entries: dict[str, IndexEntry]) -> dict[str, torch.Tensor | None]:
        """Summaries not kept here: from the job's entries where they carry one (chunks prefilled for this request),
        the rest from the index in one read."""
        out = {c: entries[c].summary for c in cids if entries[c].summary is not None}
        rest = [c for c in cids if c not in out]
        out.update({c: e.summary for c, e in self.index.lookup(rest).items()})
        return out

    def _missing(self, cids: list[str], entries: dict[str, IndexEntry], where: dict) -> ChunksMissing:
        """The job's answer when chunks could not be had: their index entries are dropped (the holder no longer
        has them, or cannot send them) so the router prefills them again."""
        by_holder: dict[str, list[str]] = {}
        for cid in cids:
            if cid in entries:  # indexed chunks only (the instruction's KV is this actor's own)
                by_holder.setdefault(entries[cid].holder, []).append(cid)
        for holder, lost in by_holder.items():
            self.index.remove_all(lost, holder)  # one round trip per holder
        return ChunksMissing(cids, {h: where["failed"].get(h, "missing") for h in by_holder})

    def _gather(self, need: list[str], entries: dict[str, IndexEntry], where: dict) -> dict[str, ChunkKV]:
        """KV of `need` (chunks not resident in the pool), from each holder over the path cluster/kv/kv_paths.py
        chooses for it (one failing holder costs only its own chunks). where["failed"]: holder -> why its chunks
        could not be had."""
        got = {}
        for group in self.kv_paths.plan(need, entries):
            fetched = self._fetch(group, where)
            if fetched is None:
                where["failed"][group.holder] = where["errors"][-1]
                continue
            if fetched.error:
                where["failed"][group.holder] = fetched.error
            got.update(fetched.chunks)
            where["bytes"] += fetched.bytes
            for path, n in fetched.paths.items():
                per_chunk = fetched.bytes * n // max(1, len(fetched.chunks))
                if path == NODE:  # through host memory on this node (counted apart, as before)
                    where["node"] += n
                    metrics.record_fetch("local", per_chunk)
                    continue
                where["remote"] += n
                where["paths"][path] = where["paths"].get(path, 0) + n
                if path in metrics.TRANSPORTS:
                    metrics.record_fetch(path, per_chunk)
        return got

    def _fetch(self, group: HolderFetch, where: dict) -> FetchResult | None:
        """One holder's chunks over their path, tried 1 + fetch_retries times; None if every try failed
        (the reasons are appended to where["errors"])."""
        for attempt in range(self.limits.fetch_retries + 1):
            try:
                fetched = self.kv_paths.fetch(group, timeout_s=self.limits.fetch_timeout_s)
            except TransferError as e:
                reason = str(e)
                where["errors"].append(reason)
                with self._count_lock:
                    self.fetch_failures[_failure_kind(reason)] += 1
                log.warning("fetch of %d chunks from %s failed (try %d): %s", len(group.items), group.address,
                            attempt + 1, e)  # fmt: skip
                continue
            if attempt:
                with self._count_lock:
                    self.fetch_recovered += 1
            return fetched
        return None

    def set_memory_budget(self, budget_bytes: int) -> None:
        """Change this actor's RSS budget (drills, reliability tests; 0: off)."""
        self.memory.set_budget(budget_bytes)

    def hold_memory(self, nbytes: int) -> None:
        """Drill: keep `nbytes` more of written memory (a leak on demand): the memory limit then ends the actor."""
        self.memory_limit.hold(nbytes)

    def status(self) -> dict:
        engine = self.engine.status()
        pool = engine["pool"]
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
            "summaries_cached": len(self.summaries),
            "cache_chunks": pool["chunks"],
            "cache_bytes": pool["used_bytes"],
            "engine": engine,
            "kv_paths": self.kv_paths.status(),
            "process": process_stats(),
            **self.memory.status(),
            **self.memory_limit.status(),
            **self.heap.status(),
            "metrics": metrics.snapshot(),
            "counters": counters.snapshot(),  # index round trips, hashes: what requests cost here
        }


def _failure_kind(reason: str) -> str:
    """A short label for a fetch failure (status counters)."""
    for needle, kind in (("checksum", "checksum"), ("DEADLINE", "deadline"), ("middle of a chunk", "truncated")):
        if needle in reason:
            return kind
    return "error"


def _where() -> dict:
    """Where a job's chunks came from (filled by _gather)."""
    return {"node": 0, "remote": 0, "bytes": 0, "paths": {}, "failed": {}, "errors": []}


def _on(chunk: ChunkKV, device: torch.device) -> ChunkKV:
    """The chunk's KV on `device` (draft ranking reads fetched KV outside the pool)."""
    if chunk.k.device == device:
        return chunk
    k, v, s = chunk.k.to(device), chunk.v.to(device), chunk.summary.to(device)
    return ChunkKV(chunk.chunk_id, chunk.tokens, k, v, s, chunk.has_bos)
