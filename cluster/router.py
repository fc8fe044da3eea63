"""The router: tokenizes and chunks a request, asks the index which chunks already have KV, sends the missing ones
to the least-loaded prefill actor, and sends the job to the decode actor with the best mix of load and chunk
affinity. Queues are bounded: when every actor of a kind is full, `ClusterBusy` says so instead of queueing more.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import asdict, dataclass, field

import ray
from pdllm.cluster.chunk_index import ChunkIndex
from pdllm.cluster.limits import ClusterLimits

from pdllm.errors import InvalidRequest, PdllmError
from pdllm.method import MethodConfig, chunk_id, split_chunks
from pdllm.prompt import DEFAULT_MAX_CONTEXT_TOKENS, encode_request
from pdllm.sampler import SamplerConfig

AFFINITY_MEMORY = 4096  # chunk ids remembered per decode actor (what it has fetched recently)
WAIT_POLL_S = 0.02


class ClusterBusy(PdllmError):
    """Every actor of a kind has a full queue: back off and retry."""


class ClusterTimeout(PdllmError):
    """An actor did not answer within the configured time."""


@dataclass
class ActorSlot:
    name: str
    node: str
    handle: object  # ray.actor.ActorHandle
    max_queued: int
    inflight: int = 0
    recent: OrderedDict = field(default_factory=OrderedDict)  # chunk ids this decode actor fetched

    def remember(self, cids: list[str]) -> None:
        for cid in cids:
            self.recent[cid] = None
            self.recent.move_to_end(cid)
        while len(self.recent) > AFFINITY_MEMORY:
            self.recent.popitem(last=False)


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
        self.completed = 0
        self.rejected = 0

    # ---- placement -------------------------------------------------------------------------------------------
    def _acquire(self, slot: ActorSlot) -> None:
        slot.inflight += 1

    def _release(self, slot: ActorSlot) -> None:
        with self._lock:
            slot.inflight -= 1

    def pick_prefill(self) -> ActorSlot:
        with self._lock:
            open_slots = [s for s in self.prefill if s.inflight < s.max_queued]
            if not open_slots:
                self.rejected += 1
                raise ClusterBusy(f"all {len(self.prefill)} prefill actors have full queues; retry later")
            slot = min(open_slots, key=lambda s: s.inflight)
            self._acquire(slot)
            return slot

    def pick_decode(self, cids: list[str], holders: dict[str, str]) -> ActorSlot:
        """Score = share of the request's chunks the actor holds (cached, or on its node) - its queue fill."""
        unique = set(cids)
        with self._lock:
            open_slots = [s for s in self.decode if s.inflight < s.max_queued]
            if not open_slots:
                self.rejected += 1
                raise ClusterBusy(f"all {len(self.decode)} decode actors have full queues; retry later")

            def score(s: ActorSlot) -> float:
                held = sum(1 for c in unique if c in s.recent or holders.get(c) == s.node)
                return held / max(1, len(unique)) - s.inflight / s.max_queued

            slot = max(open_slots, key=lambda s: (score(s), -s.inflight))
            self._acquire(slot)
            return slot

    def _get(self, ref, what: str):
        try:
            return ray.get(ref, timeout=self.limits.call_timeout_s)
        except ray.exceptions.GetTimeoutError as e:
            ray.cancel(ref)
            raise ClusterTimeout(f"{what} did not answer within {self.limits.call_timeout_s}s") from e
        except ray.exceptions.RayTaskError as e:
            cause = e.as_instanceof_cause()
            if isinstance(cause, PdllmError):
                raise cause from None
            raise

    # ---- prefill ---------------------------------------------------------------------------------------------
    def ensure_chunks(self, chunks: list[list[int]], ids: list[str], method: MethodConfig) -> dict:
        """Make every chunk's KV available somewhere; returns counts of chunks encoded for this request and reused."""
        unique = dict(zip(ids, chunks, strict=True))
        present = set(self.index.lookup(list(unique)))
        todo = {cid: c for cid, c in unique.items() if cid not in present}
        encoded = 0
        deadline = time.monotonic() + self.limits.call_timeout_s
        while todo:
            slot = self.pick_prefill()
            try:
                ref = slot.handle.prefill.remote(list(todo.values()), asdict(method))
                out = self._get(ref, f"prefill actor {slot.name}")
            finally:
                self._release(slot)
            encoded += len(out["encoded"])
            waiting = self._wait_for(out["waiting"], deadline)  # claimed by another actor: wait for its entry
            todo = {cid: unique[cid] for cid in waiting}  # claims that expired without an entry: prefill again
        return {"prefill_chunks": encoded, "reused_chunks": len(ids) - encoded}

    def _wait_for(self, cids: list[str], deadline: float) -> list[str]:
        """Wait until each id is indexed; returns those whose claim vanished without an entry (claimant died)."""
        pending, dead = set(cids), []
        while pending:
            pending -= set(self.index.lookup(sorted(pending)))
            if not pending:
                break
            claimed = self.index.claimed(sorted(pending))
            for cid, held in claimed.items():
                if not held and cid not in self.index.lookup([cid]):
                    dead.append(cid)
                    pending.discard(cid)
            if time.monotonic() > deadline:
                raise ClusterTimeout(f"{len(pending)} chunks claimed by another prefill actor never appeared")
            time.sleep(WAIT_POLL_S)
        return dead

    # ---- the request -----------------------------------------------------------------------------------------
    def generate(
        self,
        context: str,
        question: str,
        method: MethodConfig | None = None,
        sampler: SamplerConfig | None = None,
        request_id: str | None = None,
        seed: int = 0,
    ) -> dict:
        """Answer `question` about `context` on the cluster: {"answer": str, "stats": {...}}."""
        t0 = time.perf_counter()
        check_request_params(method, sampler)
        request_id = request_id or uuid.uuid4().hex
        method = method or self.default_method
        sampler = sampler or SamplerConfig()
        method.validate(self.max_position)
        sampler.validate()
        req = encode_request(self.tokenizer, context, question, self.max_context_tokens)
        chunks = split_chunks(req.context_ids, method.chunk_size)
        ids = [chunk_id(self.model_id, c, method.chunk_size, method.use_bos) for c in chunks]
        encoded = 0
        job = {
            "question_ids": req.question_ids,
            "chunk_ids": ids,
            "method": asdict(method),
            "sampler": asdict(sampler),
            "seed": seed,
        }
        prefill_s = 0.0
        attempt = 0
        for attempt in range(self.limits.max_retries + 1):  # noqa: B007 (reported as retries)
            t_prefill = time.perf_counter()
            counts = self.ensure_chunks(chunks, ids, method)
            prefill_s += time.perf_counter() - t_prefill
            encoded += counts["prefill_chunks"]
            entries = self.index.lookup(sorted(set(ids)))
            slot = self.pick_decode(ids, {c: e.node for c, e in entries.items()})
            try:
                out = self._get(slot.handle.decode.remote(job), f"decode actor {slot.name}")
            finally:
                self._release(slot)
            if "missing" not in out:
                break  # else: a selected chunk was evicted between lookup and fetch; prefill it again and retry
        else:
            raise ClusterTimeout(
                f"selected chunks kept vanishing (evicted) after {self.limits.max_retries} retries: is the chunk "
                f"store large enough for this document's {len(set(ids))} chunks?"
            )
        stats = out["stats"]
        with self._lock:
            slot.remember([ids[i] for i in stats.get("selected_chunk_indices", [])])
            self.completed += 1
        stats.update(
            request_id=request_id,
            chunks=len(ids),
            context_tokens=len(req.context_ids),
            question_tokens=len(req.question_ids),
            generated_tokens=len(out["tokens"]),
            retries=attempt,
            prefill_seconds=round(prefill_s, 4),
            total_seconds=round(time.perf_counter() - t0, 4),
            prefill_chunks=encoded,
            reused_chunks=max(0, len(ids) - encoded),
        )
        return {"answer": out["answer"], "stats": stats}

    # ---- status ----------------------------------------------------------------------------------------------
    def status(self, timeout_s: float = 5.0) -> dict:
        """Actors, store usage, index size and queue depths (actors that do not answer in time say so)."""

        def ask(slots: list[ActorSlot], kind: str) -> list[dict]:
            refs = [s.handle.status.remote() for s in slots]
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
            out = []
            for s, ref in zip(slots, refs, strict=True):
                row = {"kind": kind, "name": s.name, "node": s.node, "queued": s.inflight, "max_queued": s.max_queued}
                try:
                    row.update(ray.get(ref, timeout=0) if ref in ready else {"error": "no answer"})
                except ray.exceptions.RayError as e:
                    row["error"] = type(e).__name__
                out.append(row)
            return out

        prefill, decode = ask(self.prefill, "prefill"), ask(self.decode, "decode")
        stores = [p for p in prefill if "used_bytes" in p]
        return {
            "actors": prefill + decode,
            "store": {
                "used_bytes": sum(p["used_bytes"] for p in stores),
                "capacity_bytes": sum(p["capacity_bytes"] for p in stores),
                "chunks": sum(p["chunks"] for p in stores),
                "evictions": sum(p["evictions"] for p in stores),
            },
            "index_size": self.index.size(),
            "queues": {
                "prefill": sum(s.inflight for s in self.prefill),
                "decode": sum(s.inflight for s in self.decode),
                "prefill_capacity": sum(s.max_queued for s in self.prefill),
                "decode_capacity": sum(s.max_queued for s in self.decode),
            },
            "completed": self.completed,
            "rejected": self.rejected,
        }


def check_request_params(method: MethodConfig | None, sampler: SamplerConfig | None) -> None:
    if method is not None and not isinstance(method, MethodConfig):
        raise InvalidRequest("method must be a MethodConfig")
    if sampler is not None and not isinstance(sampler, SamplerConfig):
        raise InvalidRequest("sampler must be a SamplerConfig")
