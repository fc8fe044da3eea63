"""The router: tokenizes and chunks a request, asks the index which chunks already have KV, sends the missing ones
to the least-loaded prefill actor, and sends the job to the decode actor with the best mix of load and chunk
affinity. Queues are bounded: when every actor of a kind is full, `ClusterBusy` says so instead of queueing more.

Faults. A decode actor that dies during a job (killed, its node removed) is marked lost and the job runs again on
another decode actor: decoding is a pure function of the job, so a second run cannot answer differently or twice.
A prefill actor that dies is marked lost, its index entries are deleted (they point at KV that is gone), and its
work goes to another prefill actor. A holder that a decode actor could not read from is asked whether it is alive
(`probe_timeout_s`); if not, the same happens to it; if it is, the chunks are prefilled again elsewhere.
Actors started with Ray `max_restarts` come back: a dead one is RESTARTING, a watcher thread asks the handle for
`info()` until the new incarnation (a new pid) answers and then admits it again (`on_readmit` redoes cluster-level
start-up such as the collective group); a request that finds no live actor of a kind waits for one up to
`restart_timeout_s` (its deadline first), so work in flight on the dead actor runs once more on the new incarnation.
The decode job streams its progress back (`decode_stream`); the request's deadline bounds every wait, and a caller
that goes away (its `on_event` raises) cancels the decode job at its next step.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable

import ray
from pdllm.cluster.common.errors import ActorLost, ClusterTimeout, ClusterUnavailable, RequestExpired
from pdllm.cluster.common.limits import ClusterLimits
from pdllm.cluster.kv.chunk_index import ChunkIndex, IndexEntry
from pdllm.cluster.kv.jobs import (
    ChunksMissing,
    DecodeResult,
    DecodeTask,
    PrefillJob,
    PrefillResult,
    StepEvent,
    StreamCancelled,
)
from pdllm.cluster.router.assembly import assemble
from pdllm.cluster.router.faults import FaultBook
from pdllm.cluster.router.placement import Placement
from pdllm.cluster.router.slots import ACTOR_GONE, ActorSlot, control
from pdllm.cluster.router.status import StatusReport

from pdllm.errors import InvalidRequest, PdllmError
from pdllm.method import MethodConfig
from pdllm.observability import metrics
from pdllm.observability.logs import current_request_id, request_context
from pdllm.prompt import DEFAULT_MAX_CONTEXT_TOKENS
from pdllm.sampler import SamplerConfig

log = logging.getLogger(__name__)


class Router(Placement, FaultBook, StatusReport):
    def __init__(
        self,
        prefill: list[ActorSlot],
        decode: list[ActorSlot],
        index: ChunkIndex,
        tokenizer,
        model_id: str,
        default_method: MethodConfig,
        limits: ClusterLimits,
        max_position: int | None = None,
        max_context_tokens: int = DEFAULT_MAX_CONTEXT_TOKENS,
    ) -> None:
        self.prefill, self.decode = prefill, decode
        self.index, self.tokenizer, self.model_id = index, tokenizer, model_id
        self.default_method, self.limits = default_method, limits
        self.max_position, self.max_context_tokens = max_position, max_context_tokens
        self._lock = threading.Lock()
        self._placeable = threading.Condition(self._lock)  # notified when an actor is admitted again or given up
        self._closing = threading.Event()
        self._helpers: list[threading.Thread] = []  # readmit watchers and rejoin threads: close() joins them
        self.on_readmit: Callable[[str, ActorSlot], None] | None = None  # (kind, slot) after a new incarnation
        self.completed = 0
        self.rejected = 0
        self.failed = 0
        self.active = 0  # requests inside generate() right now
        self.faults = {
            "actors_lost": 0,
            "decode_failovers": 0,  # decode jobs run again on another actor after theirs died
            "prefill_failovers": 0,  # prefill calls sent to another actor after theirs died
            "refetch_retries": 0,  # decode jobs run again after selected chunks were missing or unreadable
            "stale_entries_removed": 0,  # index entries deleted because their holder was lost
            "cancelled_jobs": 0,  # decode jobs cancelled (caller gone, deadline)
            "actor_restarts": 0,  # new incarnations admitted again after a death
        }

    def close(self, join_timeout_s: float = 10.0) -> None:
        """Stop the watchers of restarting actors and wait for them (cluster shutdown): a helper thread that made
        a Ray call after Ray shut down would start or join a Ray instance of its own."""
        self._closing.set()
        with self._lock:
            self._placeable.notify_all()
            helpers = list(self._helpers)
        until = time.monotonic() + join_timeout_s
        for thread in helpers:
            thread.join(max(0.0, until - time.monotonic()))
        stuck = [t.name for t in helpers if t.is_alive()]
        if stuck:
            log.warning("router closed with helper threads still running: %s", ", ".join(stuck))

    def _spawn(self, target: Callable[..., None], *args: object, name: str) -> None:
        """Run `target(*args)` on a daemon thread that close() waits for; none starts once closing."""
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        with self._lock:
            if self._closing.is_set():
                return
            self._helpers = [t for t in self._helpers if t.is_alive()] + [thread]
        thread.start()

    def _timeout(self, deadline: float | None) -> float:
        """Seconds the next wait may take: the per-call limit, cut to the request's deadline."""
        if deadline is None:
            return self.limits.call_timeout_s
        left = deadline - time.monotonic()
        if left <= 0:
            raise RequestExpired("the request's deadline passed")
        return min(left, self.limits.call_timeout_s)

    def _timed_out(self, what: str, deadline: float | None) -> ClusterTimeout:
        if deadline is not None and time.monotonic() >= deadline - 1e-3:
            return RequestExpired(f"the request's deadline passed while waiting for {what}")
        return ClusterTimeout(f"{what} did not answer within {self.limits.call_timeout_s}s")

    def _get(self, ref, what: str, deadline: float | None = None):
        try:
            return ray.get(ref, timeout=self._timeout(deadline))
        except ray.exceptions.GetTimeoutError as e:
            ray.cancel(ref)
            raise self._timed_out(what, deadline) from e
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, PdllmError):  # the actor's own error, without Ray's traceback around it
                raise e.cause from None
            raise

    # ---- prefill ---------------------------------------------------------------------------------------------
    def ensure_chunks(
        self,
        todo: dict[str, list[int]],
        method: MethodConfig,
        deadline: float | None = None,
        avoid: set[str] = frozenset(),
    ) -> tuple[dict[str, IndexEntry], int]:
        """Make the KV of every chunk in `todo` (id -> tokens: the ones the router's read found no entry for)
        available; returns their index entries (as the prefill actors wrote them) and how many were encoded."""
        entries: dict[str, IndexEntry] = {}
        encoded, failovers = 0, 0
        wait_until = time.monotonic() + self._timeout(deadline)
        while todo:
            slot = self.pick_prefill(avoid, deadline)
            try:
                job = PrefillJob(chunks=dict(todo), method=method, request_id=current_request_id())
                out: PrefillResult = self._get(slot.handle.prefill.remote(job), f"prefill actor {slot.name}", deadline)
            except ACTOR_GONE as e:
                message = self._lost(slot, e)
                failovers += 1
                with self._lock:
                    self.faults["prefill_failovers"] += 1
                if failovers > len(self.prefill):
                    raise ClusterUnavailable(f"prefill actors kept dying under this request: {message}") from None
                continue  # the same chunks go to another (or the restarted) prefill actor
            finally:
                self._release(slot)
            encoded += len(out.encoded)
            entries.update(out.entries)
            # claimed by another actor, or registered by one since the router looked: wait for (read) their entries
            found, dead = self._wait_for(out.waiting + out.indexed_elsewhere, wait_until)
            entries.update(found)
            todo = {cid: todo[cid] for cid in dead}  # claims that expired without an entry: prefill again
        return entries, encoded

    def _wait_for(self, cids: list[str], until: float) -> tuple[dict[str, IndexEntry], list[str]]:
        """Entries of chunks other prefill actors claimed, once they land (the index tells), and the ids whose
        claimant died; only chunks two requests race for come here."""
        try:
            return self.index.wait_for(cids, until)
        except TimeoutError as e:
            raise ClusterTimeout(str(e)) from None

    # ---- decode ----------------------------------------------------------------------------------------------
    def _decode(
        self, slot: ActorSlot, job: DecodeTask, on_event: Callable[[dict], None] | None, deadline: float | None
    ) -> DecodeResult | ChunksMissing:
        """Run `job` on `slot` as a stream, passing step events to `on_event`; returns the decode actor's answer.
        Anything but a normal end (caller gone, deadline, error) cancels the job on the actor."""
        what = f"decode actor {slot.name}"
        gen = slot.handle.decode_stream.options(
            num_returns="streaming", _generator_backpressure_num_objects=self.limits.stream_events
        ).remote(job)
        finished = False
        try:
            while True:
                ready, _ = ray.wait([gen], timeout=self._timeout(deadline))
                if not ready:
                    raise self._timed_out(what, deadline)
                try:
                    event = ray.get(next(gen), timeout=self._timeout(deadline))
                except StopIteration:
                    finished = True
                    raise ClusterTimeout(f"{what} ended the job without a result") from None
                except ACTOR_GONE as e:
                    finished = True  # nothing left to cancel
                    raise ActorLost(self._lost(slot, e)) from None
                except ray.exceptions.GetTimeoutError as e:
                    raise self._timed_out(what, deadline) from e
                except ray.exceptions.RayTaskError as e:
                    finished = True
                    if isinstance(e.cause, PdllmError):  # the actor's own error, without Ray's traceback around it
                        raise e.cause from None
                    raise
                if isinstance(event, StepEvent):
                    if on_event is not None:
                        on_event(event.as_event())
                    continue
                finished = True
                if isinstance(event, StreamCancelled):
                    raise ClusterTimeout(f"{what} cancelled the job")
                return event
        finally:
            if not finished:
                with self._lock:
                    self.faults["cancelled_jobs"] += 1
                try:
                    control(slot.handle.cancel).remote(job.job_id)
                    ray.cancel(gen)
                except Exception as e:  # the actor is gone: nothing runs there any more
                    log.info("cancelling job %s on %s: %s", job.job_id, slot.name, e)

    # ---- the request -----------------------------------------------------------------------------------------
    def generate(
        self,
        context: str,
        question: str,
        method: MethodConfig | None = None,
        sampler: SamplerConfig | None = None,
        request_id: str | None = None,
        seed: int = 0,
        *,
        on_event: Callable[[dict], None] | None = None,
        timeout_s: float | None = None,
        instruction: str = "",
    ) -> dict:
        """Answer `question` about `context` on the cluster: {"answer": str, "stats": {...}}; `instruction` is kept
        whole before the context.

        `on_event` receives {"type": "prefill", ...} and {"type": "step", ...} dicts (pdllm.cluster.api.backend
        documents them); whatever it raises stops the request and is re-raised. `timeout_s` bounds the whole
        request (RequestExpired); without it each wait is bounded by `limits.call_timeout_s`."""
        request_id = request_id or uuid.uuid4().hex
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with request_context(request_id):
            with self._lock:
                self.active += 1
            t0 = time.perf_counter()
            try:
                out = self._generate(
                    context, question, method, sampler, request_id, seed, on_event, deadline, instruction
                )
            except BaseException as e:
                with self._lock:
                    self.failed += 1
                log.info("request failed after %.1f ms: %s: %s", 1000 * (time.perf_counter() - t0), type(e).__name__, e)
                raise
            finally:
                with self._lock:
                    self.active -= 1
            with self._lock:
                self.completed += 1
            stats = out["stats"]
            log.info(
                "answered in %.1f ms on %s (%d chunks, %d prefilled)", 1000 * (time.perf_counter() - t0),
                stats.get("decode_actor"), stats.get("chunks", 0), stats.get("prefill_chunks", 0),
            )  # fmt: skip
            return out

    def _generate(
        self, context, question, method, sampler, request_id, seed, on_event, deadline, instruction=""
    ) -> dict:
        t0 = time.perf_counter()
        check_request_params(method, sampler)
        method = method or self.default_method
        sampler = sampler or SamplerConfig()
        method.validate(self.max_position)
        sampler.validate()
        req = assemble(self.tokenizer, self.model_id, context, question, instruction, method, self.max_context_tokens)
        ids, unique = req.chunk_ids, req.chunks
        total_steps = sampler.steps if sampler.threshold is None else sampler.gen_length

        def prefill_event(done: int, reused: int) -> None:
            if on_event is not None:
                on_event(
                    {
                        "type": "prefill",
                        "done_chunks": done,
                        "total_chunks": len(ids),
                        "reused_chunks": reused,
                        "context_tokens": req.context_tokens,
                    }
                )

        prefill_event(0, 0)
        encoded, prefill_s, retries, failovers = 0, 0.0, 0, 0
        avoid_prefill: set[str] = set()
        entries = self.index.lookup(list(unique), summaries=False)  # the request's one read of the index
        while True:
            t_prefill = time.perf_counter()
            todo = {cid: tokens for cid, tokens in unique.items() if cid not in entries}
            metrics.record_cache(hit=True, n=len(unique) - len(todo))
            metrics.record_cache(hit=False, n=len(todo))
            made, n_encoded = self.ensure_chunks(todo, method, deadline, avoid_prefill)
            entries.update(made)
            prefill_s += time.perf_counter() - t_prefill
            encoded += n_encoded
            prefill_event(len(ids), max(0, len(ids) - encoded))
            slot = self.pick_decode(ids, {c: e.node for c, e in entries.items()}, deadline=deadline)
            job = DecodeTask(
                job_id=uuid.uuid4().hex, request_id=request_id, question_ids=req.question_ids, chunk_ids=ids,
                entries={c: entries[c] for c in unique if c in entries}, method=method, sampler=sampler, seed=seed,
                instruction_ids=req.instruction_ids, stream=on_event is not None, total_steps=total_steps,
            )  # fmt: skip
            try:
                out = self._decode(slot, job, on_event, deadline)
            except ActorLost as e:
                failovers += 1
                with self._lock:
                    self.faults["decode_failovers"] += 1
                if failovers > len(self.decode):
                    raise ClusterUnavailable(f"decode actors kept dying under this request: {e}") from None
                log.warning("request %s: %s; running it once more", request_id, e)
                continue
            finally:
                self._release(slot)
            if isinstance(out, DecodeResult):
                break
            # selected chunks were evicted, or their holder died or could not send them: prefill again, retry
            retries += 1
            with self._lock:
                self.faults["refetch_retries"] += 1
            self._after_missing(out.holders, avoid_prefill)
            if retries > self.limits.max_retries:
                raise ClusterTimeout(
                    f"selected chunks kept vanishing (evicted or unreadable) after {self.limits.max_retries} "
                    f"retries: is the chunk store large enough for this document's {len(unique)} chunks? "
                    f"last holders: {out.holders}"
                )
            entries = self.index.lookup(list(unique), summaries=False)  # lost holders' entries are gone by now
        stats = dict(out.stats)
        with self._lock:
            slot.remember([ids[i] for i in stats.get("selected_chunk_indices", [])])
        stats.update(
            request_id=request_id,
            chunks=len(ids),
            context_tokens=req.context_tokens,
            question_tokens=len(req.question_ids),
            generated_tokens=len(out.tokens),
            retries=retries,
            failovers=failovers,
            prefill_seconds=round(prefill_s, 4),
            total_seconds=round(time.perf_counter() - t0, 4),
            prefill_chunks=encoded,
            reused_chunks=max(0, len(ids) - encoded),
        )
        return {"answer": out.answer, "stats": stats}


def check_request_params(method: MethodConfig | None, sampler: SamplerConfig | None) -> None:
    if method is not None and not isinstance(method, MethodConfig):
        raise InvalidRequest("method must be a MethodConfig")
    if sampler is not None and not isinstance(sampler, SamplerConfig):
        raise InvalidRequest("sampler must be a SamplerConfig")
