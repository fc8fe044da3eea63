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
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import ray
from pdllm.cluster.actor_faults import death_cause, death_message
from pdllm.cluster.chunk_index import ChunkIndex
from pdllm.cluster.limits import ClusterLimits

from pdllm.errors import InvalidRequest, PdllmError
from pdllm.method import MethodConfig, chunk_id, split_chunks
from pdllm.observability import metrics
from pdllm.observability.logs import current_request_id, request_context
from pdllm.prompt import DEFAULT_MAX_CONTEXT_TOKENS, encode_request
from pdllm.sampler import SamplerConfig

log = logging.getLogger(__name__)
AFFINITY_MEMORY = 4096  # chunk ids remembered per decode actor (what it has fetched recently)
WAIT_POLL_S = 0.02
CONTROL = "control"  # the actors' concurrency group for status/cancel: answered even when every job thread is busy
UP, DOWN, DEAD = "up", "down", "dead"  # DOWN: did not answer a probe (may come back); DEAD: Ray says it died
RESTARTING = "restarting"  # died, and Ray restarts it (max_restarts): placed again once its new incarnation answers
RESTARTED_UNSEEN = "restarted while idle"  # the cause when only a new pid tells of a death
READMIT_POLL_S = 0.2  # between the watcher's looks at a restarting actor
# what a call to a dead actor raises: its process died (killed, crashed, node lost), or Ray's memory monitor killed it
ACTOR_GONE = (ray.exceptions.RayActorError, ray.exceptions.OutOfMemoryError)


class ClusterBusy(PdllmError):
    """Every actor of a kind has a full queue: back off and retry."""


class ClusterTimeout(PdllmError):
    """An actor did not answer within the configured time."""


class RequestExpired(ClusterTimeout):
    """The request's own deadline passed."""


class ClusterUnavailable(PdllmError):
    """No live actor of a kind is left to run the request."""


class _ActorLost(PdllmError):
    """A decode actor died during the job (internal: the job runs again elsewhere)."""


@dataclass
class ActorSlot:
    name: str
    node: str
    handle: object  # ray.actor.ActorHandle
    max_queued: int
    batch: int = 1  # jobs the actor runs at once (a decode actor's max batch)
    inflight: int = 0
    recent: OrderedDict = field(default_factory=OrderedDict)  # chunk ids this decode actor fetched
    state: str = UP
    pid: int | None = None  # the process of the incarnation last seen answering
    restartable: bool = False  # Ray restarts it after a death (started with max_restarts > 0)
    restarts: int = 0  # new incarnations admitted
    fault: dict | None = None  # the last death or silence: {"cause", "at" (time.time())}
    watching: bool = False  # a watcher thread waits for it to answer again

    @property
    def alive(self) -> bool:
        return self.state == UP

    def remember(self, cids: list[str]) -> None:
        for cid in cids:
            self.recent[cid] = None
            self.recent.move_to_end(cid)
        while len(self.recent) > AFFINITY_MEMORY:
            self.recent.popitem(last=False)


def control(method):
    """`actor.method` sent to the control concurrency group (answers while jobs occupy the default group)."""
    return method.options(concurrency_group=CONTROL)


class Router:
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

    def close(self) -> None:
        """Stop the watchers of restarting actors (cluster shutdown)."""
        self._closing.set()
        with self._lock:
            self._placeable.notify_all()

    # ---- placement -------------------------------------------------------------------------------------------
    def _acquire(self, slot: ActorSlot) -> None:
        slot.inflight += 1
        self._publish_depth()

    def _release(self, slot: ActorSlot) -> None:
        with self._lock:
            slot.inflight -= 1
            self._publish_depth()

    def _publish_depth(self) -> None:
        metrics.set_queue_depth("prefill", sum(s.inflight for s in self.prefill))
        metrics.set_queue_depth("decode", sum(s.inflight for s in self.decode))

    def _open(
        self, slots: list[ActorSlot], kind: str, avoid: set[str], deadline: float | None = None
    ) -> list[ActorSlot]:
        """Open slots (the lock held); with none up but some coming back, wait for one (restart_timeout_s, or the
        request's deadline first)."""
        if not any(s.alive for s in slots) and any(s.watching for s in slots):
            wait = self.limits.restart_timeout_s
            if deadline is not None:
                wait = min(wait, max(0.0, deadline - time.monotonic()))
            self._placeable.wait_for(
                lambda: self._closing.is_set() or any(s.alive for s in slots) or not any(s.watching for s in slots),
                wait,
            )
        live = [s for s in slots if s.alive]
        if not live:
            faults = [s.fault["message"] for s in slots if s.fault]
            why = f": {faults[-1]}" if faults else ""
            raise ClusterUnavailable(f"no live {kind} actor is left (of {len(slots)}){why}; see `pdllm status`")
        open_slots = [s for s in live if s.inflight < s.max_queued]
        if not open_slots:
            self.rejected += 1
            raise ClusterBusy(f"all {len(live)} {kind} actors have full queues; retry later")
        return [s for s in open_slots if s.name not in avoid] or open_slots

    def pick_prefill(self, avoid: set[str] = frozenset(), deadline: float | None = None) -> ActorSlot:
        with self._lock:
            slot = min(self._open(self.prefill, "prefill", avoid, deadline), key=lambda s: s.inflight)
            self._acquire(slot)
            return slot

    def pick_decode(
        self, cids: list[str], holders: dict[str, str], avoid: set[str] = frozenset(), deadline: float | None = None
    ) -> ActorSlot:
        """An actor with a free batch row first (waiting behind a whole job costs more than any fetch saves), then
        score = share of the request's chunks the actor holds (cached, or on its node) - its queue fill."""
        unique = set(cids)
        with self._lock:
            open_slots = self._open(self.decode, "decode", avoid, deadline)

            def score(s: ActorSlot) -> float:
                held = sum(1 for c in unique if c in s.recent or holders.get(c) == s.node)
                return held / max(1, len(unique)) - s.inflight / s.max_queued

            free = lambda s: s.inflight < s.batch  # noqa: E731
            slot = max(open_slots, key=lambda s: (free(s), score(s), -s.inflight))
            self._acquire(slot)
            return slot

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

    # ---- faults ----------------------------------------------------------------------------------------------
    def _kind(self, slot: ActorSlot) -> str:
        return "prefill" if slot in self.prefill else "decode"

    def _lost(self, slot: ActorSlot, why: object, dead: bool = True) -> str:
        """Take `slot` out of placement; a prefill actor's index entries and claims go too (its KV is unreachable).
        `why`: the Ray error (its dump is logged here, once) or a reason. A restartable actor is watched until its
        new incarnation answers. Returns the one-line message for the caller (`decode actor died: ...`)."""
        kind = self._kind(slot)
        cause = death_cause(why) if isinstance(why, BaseException) else str(why)
        restarting = slot.restartable
        message = death_message(kind, cause, restarting) if dead else f"{kind} actor {slot.name} not answering: {cause}"
        with self._lock:
            was = slot.state
            if was == UP or (dead and was == DOWN):
                slot.state = RESTARTING if dead and restarting else DEAD if dead else DOWN
                slot.fault = {"cause": cause, "message": message, "at": time.time()}
            if was == UP:
                self.faults["actors_lost"] += 1
            watch = slot.restartable and not slot.watching and slot.state in (RESTARTING, DOWN)
            slot.watching = slot.watching or watch
        metrics.set_actor_health(slot.name, False)
        if watch:
            threading.Thread(target=self._watch, args=(slot,), name=f"readmit-{slot.name}", daemon=True).start()
        if was != UP:
            return message
        if dead:
            metrics.record_actor_death(kind, cause)
            log.error("%s", message.replace(f"{kind} actor", f"{kind} actor {slot.name}", 1))
            if isinstance(why, BaseException):
                log.info("actor %s: Ray's report of the death: %s", slot.name, why)
        else:
            log.warning("actor %s lost (%s): no longer placed", slot.name, cause)
        if slot in self.prefill:
            removed = self.index.remove_holder(slot.name)
            released = self.index.release_claims_of(slot.name)
            with self._lock:
                self.faults["stale_entries_removed"] += removed
            log.warning("removed %d index entries and %d claims of lost holder %s", removed, released, slot.name)
        return message

    def _watch(self, slot: ActorSlot) -> None:
        """Wait for `slot` to answer `info()` again (Ray restarting it), then admit it; give up after
        restart_timeout_s (DEAD) or when Ray says it is gone for good (its restarts used up)."""
        ref, until = control(slot.handle.info).remote(), time.monotonic() + self.limits.restart_timeout_s
        info = None
        while not self._closing.is_set() and time.monotonic() < until:
            ready, _ = ray.wait([ref], timeout=READMIT_POLL_S)
            if not ready:
                continue
            try:
                info = ray.get(ref, timeout=0)
                break
            except ray.exceptions.ActorDiedError:
                break  # no incarnation is coming
            except ray.exceptions.RayError:  # unavailable for now (restarting): ask the next incarnation
                self._closing.wait(READMIT_POLL_S)
                ref = control(slot.handle.info).remote()
        with self._lock:
            slot.watching = False
            if info is None:
                slot.state = DEAD
            self._placeable.notify_all()
        if info is None:
            log.error("%s actor %s did not come back: no longer placed", self._kind(slot), slot.name)
            return
        self._admit(slot, info.get("pid"))

    def _admit(self, slot: ActorSlot, pid: int | None) -> None:
        """`slot` answered (as the incarnation `pid`): placed again; a new pid counts as a restart."""
        kind = self._kind(slot)
        with self._lock:
            new = slot.pid is not None and pid is not None and pid != slot.pid
            was, slot.pid = slot.state, pid if pid is not None else slot.pid
            unseen = new and was == UP  # it died and came back between two calls: no call saw the death
            if new:
                slot.restarts += 1
                self.faults["actor_restarts"] += 1
            if unseen:
                self.faults["actors_lost"] += 1
                slot.fault = {"cause": RESTARTED_UNSEEN, "message": RESTARTED_UNSEEN, "at": time.time()}
            slot.state = UP
            self._placeable.notify_all()
        metrics.set_actor_health(slot.name, True)
        if not new:
            if was != UP:
                log.info("%s actor %s answers again: placed again", kind, slot.name)
            return
        if unseen:
            metrics.record_actor_death(kind, RESTARTED_UNSEEN)
            log.error("%s actor %s died while idle (its pid changed from one status to the next)", kind, slot.name)
        metrics.record_actor_restart(kind)
        since = time.time() - slot.fault["at"] if slot.fault else float("nan")
        log.info("%s actor %s is back as a new incarnation (pid %s, restart %d, %.1f s after its death): placed "
                 "again", kind, slot.name, pid, slot.restarts, since)  # fmt: skip
        if self.on_readmit is not None:  # off this thread: a status poll must not wait for a group to form
            threading.Thread(
                target=self._readmitted, args=(kind, slot), name=f"rejoin-{slot.name}", daemon=True
            ).start()

    def _readmitted(self, kind: str, slot: ActorSlot) -> None:
        try:
            self.on_readmit(kind, slot)
        except Exception:
            log.exception("re-admitting %s actor %s", kind, slot.name)

    def _probe(self, slot: ActorSlot) -> bool:
        """Is the actor alive? Answers come from its control group, so a busy actor still says yes."""
        try:
            ray.get(control(slot.handle.status).remote(), timeout=self.limits.probe_timeout_s)
            return True
        except ray.exceptions.RayActorError as e:
            self._lost(slot, e, dead=True)
        except ray.exceptions.GetTimeoutError:
            self._lost(slot, f"no answer within {self.limits.probe_timeout_s}s", dead=False)
        return False

    def _after_missing(self, holders: dict[str, str], avoid: set[str]) -> None:
        """Selected chunks were missing or unreadable at these holders: probe ours, avoid the ones that failed."""
        by_name = {s.name: s for s in self.prefill}
        for holder, why in holders.items():
            slot = by_name.get(holder)
            if slot is None:
                continue  # a holder of an earlier run: the decode actor already dropped the entries it tried
            if why != "missing":
                avoid.add(holder)  # alive or not, it could not send: prefill these chunks elsewhere now
            if slot.alive:
                self._probe(slot)

    def sweep(self) -> int:
        """Delete index entries whose holder is not a live prefill actor of this cluster (entries that persisted
        in Redis from an earlier run, or of actors lost since). One index prefix per cluster makes this safe."""
        live = {s.name for s in self.prefill if s.alive}
        removed = 0
        for holder in self.index.holders():
            if holder not in live:
                removed += self.index.remove_holder(holder)
        with self._lock:
            self.faults["stale_entries_removed"] += removed
        return removed

    # ---- prefill ---------------------------------------------------------------------------------------------
    def ensure_chunks(
        self,
        chunks: list[list[int]],
        ids: list[str],
        method: MethodConfig,
        deadline: float | None = None,
        avoid: set[str] = frozenset(),
    ) -> dict:
        """Make every chunk's KV available somewhere; returns counts of chunks encoded for this request and reused."""
        unique = dict(zip(ids, chunks, strict=True))
        present = set(self.index.lookup(list(unique), summaries=False))
        todo = {cid: c for cid, c in unique.items() if cid not in present}
        metrics.record_cache(hit=True, n=len(present))
        metrics.record_cache(hit=False, n=len(todo))
        encoded, failovers = 0, 0
        wait_until = time.monotonic() + self._timeout(deadline)
        while todo:
            slot = self.pick_prefill(avoid, deadline)
            try:
                ref = slot.handle.prefill.remote(list(todo.values()), asdict(method), current_request_id())
                out = self._get(ref, f"prefill actor {slot.name}", deadline)
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
            encoded += len(out["encoded"])
            waiting = self._wait_for(out["waiting"], wait_until)  # claimed by another actor: wait for its entry
            todo = {cid: unique[cid] for cid in waiting}  # claims that expired without an entry: prefill again
        return {"prefill_chunks": encoded, "reused_chunks": len(ids) - encoded}

    def _wait_for(self, cids: list[str], deadline: float) -> list[str]:
        """Wait until each id is indexed; returns those whose claim vanished without an entry (claimant died)."""
        pending, dead = set(cids), []
        while pending:
            pending -= set(self.index.lookup(sorted(pending), summaries=False))
            if not pending:
                break
            claimed = self.index.claimed(sorted(pending))
            for cid, held in claimed.items():
                if not held and cid not in self.index.lookup([cid], summaries=False):
                    dead.append(cid)
                    pending.discard(cid)
            if time.monotonic() > deadline:
                raise ClusterTimeout(f"{len(pending)} chunks claimed by another prefill actor never appeared")
            time.sleep(WAIT_POLL_S)
        return dead

    # ---- decode ----------------------------------------------------------------------------------------------
    def _decode(self, slot: ActorSlot, job: dict, on_event: Callable[[dict], None] | None, deadline: float | None):
        """Run `job` on `slot` as a stream, passing step events to `on_event`; returns the decode result dict.
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
                    raise _ActorLost(self._lost(slot, e)) from None
                except ray.exceptions.GetTimeoutError as e:
                    raise self._timed_out(what, deadline) from e
                except ray.exceptions.RayTaskError as e:
                    finished = True
                    if isinstance(e.cause, PdllmError):  # the actor's own error, without Ray's traceback around it
                        raise e.cause from None
                    raise
                kind = event.get("type")
                if kind == "step":
                    if on_event is not None:
                        on_event(event)
                    continue
                finished = True
                if kind == "cancelled":
                    raise ClusterTimeout(f"{what} cancelled the job")
                return event
        finally:
            if not finished:
                with self._lock:
                    self.faults["cancelled_jobs"] += 1
                try:
                    control(slot.handle.cancel).remote(job["job_id"])
                    ray.cancel(gen)
                except Exception as e:  # the actor is gone: nothing runs there any more
                    log.info("cancelling job %s on %s: %s", job["job_id"], slot.name, e)

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

        `on_event` receives {"type": "prefill", ...} and {"type": "step", ...} dicts (pdllm.cluster.api_backend
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
        req = encode_request(self.tokenizer, context, question, self.max_context_tokens, instruction)
        chunks = split_chunks(req.context_ids, method.chunk_size)
        ids = [chunk_id(self.model_id, c, method.chunk_size, method.use_bos) for c in chunks]
        job = {
            "request_id": request_id,
            "question_ids": req.question_ids,
            "instruction_ids": req.instruction_ids,
            "chunk_ids": ids,
            "method": asdict(method),
            "sampler": asdict(sampler),
            "seed": seed,
            "stream": on_event is not None,
            "total_steps": sampler.steps if sampler.threshold is None else sampler.gen_length,
        }

        def prefill_event(done: int, reused: int) -> None:
            if on_event is not None:
                on_event(
                    {
                        "type": "prefill",
                        "done_chunks": done,
                        "total_chunks": len(ids),
                        "reused_chunks": reused,
                        "context_tokens": len(req.context_ids),
                    }
                )

        prefill_event(0, 0)
        encoded, prefill_s, retries, failovers = 0, 0.0, 0, 0
        avoid_prefill: set[str] = set()
        while True:
            t_prefill = time.perf_counter()
            counts = self.ensure_chunks(chunks, ids, method, deadline, avoid_prefill)
            prefill_s += time.perf_counter() - t_prefill
            encoded += counts["prefill_chunks"]
            prefill_event(len(ids), max(0, len(ids) - encoded))
            entries = self.index.lookup(sorted(set(ids)), summaries=False)
            slot = self.pick_decode(ids, {c: e.node for c, e in entries.items()}, deadline=deadline)
            job["job_id"] = uuid.uuid4().hex
            try:
                out = self._decode(slot, job, on_event, deadline)
            except _ActorLost as e:
                failovers += 1
                with self._lock:
                    self.faults["decode_failovers"] += 1
                if failovers > len(self.decode):
                    raise ClusterUnavailable(f"decode actors kept dying under this request: {e}") from None
                log.warning("request %s: %s; running it once more", request_id, e)
                continue
            finally:
                self._release(slot)
            if "missing" not in out:
                break
            # selected chunks were evicted, or their holder died or could not send them: prefill again, retry
            retries += 1
            with self._lock:
                self.faults["refetch_retries"] += 1
            self._after_missing(out.get("holders", {}), avoid_prefill)
            if retries > self.limits.max_retries:
                raise ClusterTimeout(
                    f"selected chunks kept vanishing (evicted or unreadable) after {self.limits.max_retries} "
                    f"retries: is the chunk store large enough for this document's {len(set(ids))} chunks? "
                    f"last holders: {out.get('holders')}"
                )
        stats = out["stats"]
        with self._lock:
            slot.remember([ids[i] for i in stats.get("selected_chunk_indices", [])])
        stats.update(
            request_id=request_id,
            chunks=len(ids),
            context_tokens=len(req.context_ids),
            question_tokens=len(req.question_ids),
            generated_tokens=len(out["tokens"]),
            retries=retries,
            failovers=failovers,
            prefill_seconds=round(prefill_s, 4),
            total_seconds=round(time.perf_counter() - t0, 4),
            prefill_chunks=encoded,
            reused_chunks=max(0, len(ids) - encoded),
        )
        return {"answer": out["answer"], "stats": stats}

    # ---- status ----------------------------------------------------------------------------------------------
    def status(self, timeout_s: float = 5.0) -> dict:
        """Actors, store usage, index size and queue depths (actors that do not answer in time say so). An actor
        that answers is up again; one that Ray reports dead is taken out of placement."""

        def ask(slots: list[ActorSlot], kind: str) -> list[dict]:
            refs = [None if s.state in (DEAD, RESTARTING) else control(s.handle.status).remote() for s in slots]
            live = [r for r in refs if r is not None]
            ready, _ = ray.wait(live, num_returns=len(live), timeout=timeout_s) if live else ([], [])
            out = []
            for s, ref in zip(slots, refs, strict=True):
                row = {"kind": kind, "role": kind, "name": s.name, "node": s.node}
                row.update(queue=s.inflight, queued=s.inflight, max_queued=s.max_queued)
                try:
                    if ref is None:
                        row["error"] = s.state
                    elif ref in ready:
                        row.update(ray.get(ref, timeout=0))
                        if s.state == DOWN or row.get("pid") != s.pid:  # back, or restarted between requests
                            self._admit(s, row.get("pid"))
                    else:
                        row["error"] = "no answer"
                except ACTOR_GONE as e:
                    row["error"] = type(e).__name__
                    self._lost(s, e)
                except ray.exceptions.RayError as e:
                    row["error"] = type(e).__name__
                row["alive"] = s.alive and "error" not in row
                row.update(state=s.state, restarts=s.restarts)
                if s.fault:
                    row["fault"] = {"cause": s.fault["cause"], "since_s": round(time.time() - s.fault["at"], 1)}
                metrics.set_actor_health(s.name, row["alive"])
                out.append(row)
            return out

        prefill, decode = ask(self.prefill, "prefill"), ask(self.decode, "decode")
        stores = [p for p in prefill if "used_bytes" in p]
        index_size = self.index.size()
        with self._lock:
            counts = {"completed": self.completed, "rejected": self.rejected, "failed": self.failed}
            counts.update(active=self.active, faults=dict(self.faults))
        return {
            "actors": prefill + decode,
            "store": {
                "used_bytes": sum(p["used_bytes"] for p in stores),
                "capacity_bytes": sum(p["capacity_bytes"] for p in stores),
                "chunks": sum(p["chunks"] for p in stores),
                "evictions": sum(p["evictions"] for p in stores),
            },
            "index_size": index_size,
            "index": {"chunks": index_size},
            "queues": {
                "prefill": sum(s.inflight for s in self.prefill),
                "decode": sum(s.inflight for s in self.decode),
                "prefill_capacity": sum(s.max_queued for s in self.prefill if s.alive),
                "decode_capacity": sum(s.max_queued for s in self.decode if s.alive),
            },
            **counts,
        }


def check_request_params(method: MethodConfig | None, sampler: SamplerConfig | None) -> None:
    if method is not None and not isinstance(method, MethodConfig):
        raise InvalidRequest("method must be a MethodConfig")
    if sampler is not None and not isinstance(sampler, SamplerConfig):
        raise InvalidRequest("sampler must be a SamplerConfig")
