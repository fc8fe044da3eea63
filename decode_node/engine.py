"""The decode engine of one device: a resident chunk-KV pool, a step scheduler, a batched (graphed) step runner, and
the thread that drives them. The decode actor and the in-process engine (`pdllm.engine.generate`) both submit jobs
here, so there is one decode path to test and to measure.

A submitter pins the chunks its job reads (`acquire`: resident ones are pinned, missing ones are brought by the
caller's fetch and written straight into pool pages), computes the job's selected rows (`selected_rows`: every row
of each chunk, or the kept fraction per layer and KV head), and submits. The job unpins its chunks when it leaves.
"""

from __future__ import annotations

import atexit
import logging
import threading
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from pdllm.decode_node.job import DecodeJob, JobHandle, JobResult
from pdllm.decode_node.kv_pool import DEFAULT_PAGE_ROWS, KVPool, page_bytes
from pdllm.decode_node.ranker import BatchedRanker
from pdllm.decode_node.runner import DEFAULT_BUCKETS, BatchBuffers, StepRunner
from pdllm.decode_node.scheduler import Scheduler
from torch import Tensor

from pdllm.devices import gpu_cache_bytes
from pdllm.errors import PdllmError
from pdllm.method.config import MethodConfig
from pdllm.method.selection import question_queries, select_tokens
from pdllm.sampler import SamplerConfig

log = logging.getLogger(__name__)
CPU_POOL_BYTES = 1 << 30
GPU_RESERVE_BYTES = 8 << 30  # left free on the GPU for activations, logits and graphs when the pool is derived


@dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 32  # jobs in one step
    pool_bytes: int = 0  # chunk-KV pool (K+V); 0: derived (GPU: 90% of free memory less a reserve; CPU: 1 GiB)
    page_rows: int = DEFAULT_PAGE_ROWS
    graph_buckets: tuple[int, ...] = DEFAULT_BUCKETS  # batch sizes a CUDA graph is captured for
    use_graphs: bool | None = None  # None: on CUDA
    max_span: int = 1280  # question tokens run + gen_length, per job
    max_block: int = 128  # block_length
    max_selected: int = 16384  # selected context rows (+ kept question rows) per job
    keep_unpinned: bool = True  # fetched chunks stay resident (LRU) after their jobs finish
    gpu_fraction: float = 1.0  # the process's share of its GPU: a derived pool stays within it (pdllm.devices)

    def validate(self) -> None:
        if self.max_batch < 1 or self.max_span < 2 or self.max_block < 1 or self.max_selected < 1:
            raise ValueError("max_batch, max_block and max_selected must be >= 1 and max_span >= 2")
        if self.pool_bytes < 0 or self.page_rows < 1:
            raise ValueError("pool_bytes must be >= 0 and page_rows >= 1")
        if not 0 < self.gpu_fraction <= 1:
            raise ValueError(f"gpu_fraction must be in (0, 1], got {self.gpu_fraction}")
        if any(b < 1 for b in self.graph_buckets):
            raise ValueError(f"graph buckets must be positive batch sizes, got {self.graph_buckets}")


def parse_buckets(text: str | tuple[int, ...] | list[int]) -> tuple[int, ...]:
    """'1,2,4,8' (or a sequence) -> (1, 2, 4, 8), sorted, each >= 1."""
    items = text.split(",") if isinstance(text, str) else list(text)
    try:
        out = tuple(sorted({int(x) for x in items if str(x).strip()}))
    except ValueError:
        raise ValueError(f"graph buckets must be comma-separated integers, got {text!r}") from None
    if not out or out[0] < 1:
        raise ValueError(f"graph buckets must be positive integers, got {text!r}")
    return out


def derive_pool_bytes(cfg: EngineConfig, device: torch.device) -> int:
    if cfg.pool_bytes:
        return cfg.pool_bytes
    if device.type != "cuda":
        return CPU_POOL_BYTES
    return gpu_cache_bytes(cfg.gpu_fraction, GPU_RESERVE_BYTES, device)


_LIVE: weakref.WeakSet = weakref.WeakSet()  # every engine not yet freed, for the exit hook


def close_all() -> None:
    """Stop every live engine's loop; runs at exit. A loop is a daemon thread, and one still running while the
    interpreter finalized aborted `pdllm generate --in-process` in 2 of 12 runs ("terminate called without an
    active exception", exit status 134) after it had printed its answer; a decode actor's process exits alike."""
    for engine in list(_LIVE):
        engine.close()


atexit.register(close_all)


def _drive(ref: weakref.ref) -> None:
    """The engine's loop. It holds the engine while there is work, and nothing of it while idle, so an engine
    its owner dropped is freed (pool included) and the loop ends, instead of the thread keeping it alive."""
    torch.set_grad_enabled(False)
    while True:
        engine = ref()
        if engine is None or engine._stop.is_set():
            return
        if engine._turn():
            continue
        signal = engine.scheduler.lock
        with signal:  # work and stop are signalled under this lock: checking and waiting under it loses none
            idle = not engine._has_work()
            engine = None
            if idle:
                signal.wait(0.1)


class EngineClosed(PdllmError):
    """The decode engine was shut down."""


class DecodeEngine:
    def __init__(self, lm, cfg: EngineConfig | None = None) -> None:
        cfg = cfg or EngineConfig()
        cfg.validate()
        self.lm, self.cfg = lm, cfg
        model, spec = lm.model, lm.spec
        self.buf = BatchBuffers(
            model, cfg.max_batch, cfg.max_span, cfg.max_block, cfg.max_selected, cfg.max_batch * cfg.max_span
        )
        pool_bytes = derive_pool_bytes(cfg, model.device)
        self.pool = KVPool(spec, model.device, model.dtype, pool_bytes, cfg.page_rows, cfg.keep_unpinned)
        self.runner = StepRunner(model, self.pool, self.buf, cfg.graph_buckets, cfg.use_graphs)
        self.scheduler = Scheduler(spec, self.pool, self.buf, self.runner)
        self.ranker = BatchedRanker(lm, self.scheduler.gpu_lock, self.scheduler.wake, cfg.max_batch)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        _LIVE.add(self)
        log.info(
            "decode engine: pool %.2f GiB (%d pages of %d rows, %d bytes each), max batch %d, graphs %s",
            self.pool.capacity_bytes / 2**30, self.pool.num_pages, cfg.page_rows,
            page_bytes(spec, model.dtype, cfg.page_rows), cfg.max_batch, self.runner.use_graphs,
        )  # fmt: skip

    # ---- the loop -----------------------------------------------------------------------------------------------

    def start(self) -> None:
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                if self._stop.is_set():
                    raise EngineClosed("the decode engine was shut down")
                ref = weakref.ref(self)
                self._thread = threading.Thread(target=_drive, args=(ref,), name="decode-engine", daemon=True)
                self._thread.start()

    def _turn(self) -> bool:
        """One pass of the loop: pending rank asks first (their jobs can join the next step), else a step; False
        when there was nothing to do."""
        if self.ranker.run_pending():
            return True
        if not self.scheduler.has_work():
            return False
        self.scheduler.step()
        return True

    def _has_work(self) -> bool:
        return self.scheduler.has_work() or self.ranker.has_pending()

    def close(self) -> None:
        _LIVE.discard(self)
        self._stop.set()
        self.scheduler.wake()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.ranker.fail_pending(EngineClosed("the decode engine was shut down"))

    # ---- submitting ---------------------------------------------------------------------------------------------

    def rank_chunks(self, question_ids: list[int], summaries: list[Tensor], top_k: int) -> list[int]:
        """selection.rank_chunks, batched with the other jobs ranking at the same time (decode_node.ranker)."""
        self.start()
        return self.ranker.rank(question_ids, summaries, top_k)

    def acquire(self, cids: list[str], fetch: Callable[[list[str]], dict], timeout_s: float) -> list[str]:
        """Pin the chunks `cids` in the pool, bringing missing ones through `fetch`; returns those not had."""
        return self.pool.acquire(cids, fetch, timeout_s)

    def release(self, cids: list[str]) -> None:
        self.pool.unpin(cids)

    @torch.no_grad()
    def selected_rows(
        self, question_ids: list[int], cids: list[str], keep_ratio: float, whole: frozenset[str] = frozenset()
    ) -> tuple[Tensor, int]:
        """Pool rows the job reads, [L, Hkv, N] int32, and the question's first position (after the longest chunk).
        `cids` must be pinned. keep_ratio < 1 keeps that share of each chunk's tokens per layer and KV head, except
        in the entries of `whole` (the instruction), which are read in full."""
        spec, pool = self.lm.spec, self.pool
        entries = [pool.entry(c) for c in cids]
        start = max((e.length for e in entries), default=0)
        layers, hkv = spec.num_layers, spec.num_kv_heads
        dev = pool.device
        if not entries:
            return torch.zeros(layers, hkv, 0, dtype=torch.int32, device=dev), 0
        if keep_ratio >= 1.0:
            rows = torch.cat([e.rows for e in entries])
            return rows[None, None].expand(layers, hkv, -1).contiguous(), start
        lengths, has_bos = [e.length for e in entries], [e.has_bos for e in entries]
        s = max(lengths)
        table = torch.zeros(len(entries), s, dtype=torch.int64, device=dev)  # (chunk, row) -> pool row
        for i, e in enumerate(entries):
            table[i, : e.length] = e.rows.long()
        with self.scheduler.gpu_lock:
            q = question_queries(self.lm, question_ids, start).q
            out = []
            for layer in range(layers):
                keys = torch.zeros(len(entries), hkv, s, spec.head_dim, dtype=pool.k.dtype, device=dev)
                for i, c in enumerate(cids):
                    keys[i, :, : lengths[i]] = pool.chunk_keys(c, layer)
                keep_whole = [c in whole for c in cids]
                local = select_tokens([q[layer]], [keys], lengths, has_bos, keep_ratio, keep_whole)[0]  # i*s + row
                out.append(table.view(-1)[local.long()].to(torch.int32))
        return torch.stack(out), start

    def submit(self, job: DecodeJob) -> JobHandle:
        self.start()
        return self.scheduler.submit(job)

    def prepare(
        self,
        question_ids: list[int],
        cids: list[str],
        fetch: Callable[[list[str]], dict],
        method: MethodConfig,
        sampler: SamplerConfig,
        seed: int = 0,
        on_step: Callable[[int, Tensor], None] | None = None,
        timeout_s: float = 300.0,
        job_id: str | None = None,
        deadline: float | None = None,
        whole: frozenset[str] = frozenset(),
    ) -> DecodeJob:
        """A job ready to submit: its chunks pinned (fetching what is missing; MissingChunks if `fetch` could not
        bring them all) and its rows selected. The job unpins its chunks when it leaves the engine."""
        absent = self.acquire(cids, fetch, timeout_s)
        if absent:
            self.release([c for c in cids if c not in absent])
            raise MissingChunks(absent)
        try:
            rows, start = self.selected_rows(question_ids, cids, method.keep_ratio, whole)
            job = DecodeJob(
                job_id=job_id or uuid.uuid4().hex,
                question_ids=list(question_ids),
                sel_rows=rows,
                start=start,
                sampler=sampler,
                keep_question_kv=method.keep_question_kv,
                seed=seed,
                on_step=on_step,
                deadline=deadline,
                release=lambda: self.release(cids),
            )
            self.scheduler.check(job)
        except BaseException:
            self.release(cids)
            raise
        return job

    def run(
        self,
        question_ids: list[int],
        cids: list[str],
        fetch: Callable[[list[str]], dict],
        method: MethodConfig,
        sampler: SamplerConfig,
        *args,
        on_submit: Callable[[JobHandle], None] | None = None,
        **kwargs,
    ) -> tuple[JobResult, dict]:
        """One job start to end (`prepare`'s arguments): prepare, submit, wait. Returns the result and the
        selection's statistics. `on_submit(handle)` sees the handle (to cancel it from elsewhere)."""
        job = self.prepare(question_ids, cids, fetch, method, sampler, *args, **kwargs)
        n_sel, start = int(job.sel_rows.shape[-1]), job.start
        handle = self.submit(job)
        if on_submit is not None:
            on_submit(handle)
        result = handle.wait()
        stats = {
            "selected_chunks": len(cids),  # a chunk selected twice (repeated text) counts, and is read, twice
            "selected_tokens": n_sel,
            "question_start_position": start,
            "kv_tokens_per_step": n_sel + len(job.question_ids) + job.sampler.gen_length,
        }
        return result, stats

    def status(self) -> dict:
        s = self.scheduler
        return {
            "running": len(s.running),
            "waiting": len(s.waiting),
            "steps": s.total_steps,
            "mean_batch": round(s.batched_jobs / max(s.total_steps, 1), 3),
            "max_batch_seen": s.max_batch_seen,
            "jobs_finished": s.finished,
            "graphs": len(self.runner.graphs),
            "graph_captures": self.runner.captures,
            "pool": self.pool.snapshot(),
            **self.ranker.status(),
        }


def instruction_first(cids: list[str], instruction) -> tuple[list[str], frozenset[str]]:
    """A job's pool entries with its instruction (a ChunkKV, or None) first, read whole in the chunks' shared
    position window, and the set of entries read whole (`prepare`'s `whole`)."""
    if instruction is None:
        return list(cids), frozenset()
    return [instruction.chunk_id, *cids], frozenset([instruction.chunk_id])


class MissingChunks(PdllmError):
    """Chunks a job needs could not be brought into the pool (their KV is gone from every holder)."""

    def __init__(self, cids: list[str]) -> None:
        super().__init__(f"{len(cids)} chunk(s) could not be fetched: {', '.join(c[:12] for c in cids)}")
        self.cids = cids
