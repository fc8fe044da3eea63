"""One short cause for an actor's death, from the Ray error that reported it, and the one-line message a client or
a batch job sees (`decode actor died: out of memory; restarting`); the router's bookkeeping of lost, restarting and
re-admitted actors (`FaultBook`).

Why: Ray's errors carry a multi-line dump (the worker's exit detail, a list of common causes that always mentions
the OOM killer, log hints). A client needs the cause in one line; the dump goes to the log, once, where it is read.
"""

from __future__ import annotations

import logging
import time

import ray
from pdllm.cluster.common.errors import KILLED, NODE_LOST, OUT_OF_MEMORY, PROCESS_LOST
from pdllm.cluster.common.memory_limit import death_note
from pdllm.cluster.router.slots import DEAD, DOWN, RESTARTED_UNSEEN, RESTARTING, UP, ActorSlot, control

from pdllm.observability import metrics

log = logging.getLogger(__name__)
READMIT_POLL_S = 0.2  # between the watcher's looks at a restarting actor


def death_cause(error: BaseException | str) -> str:
    """A short label for why an actor died: out of memory, killed by ray.kill, node lost, process lost, or the
    error's first line (cut to 120 characters)."""
    if isinstance(error, ray.exceptions.OutOfMemoryError):
        return OUT_OF_MEMORY
    text = str(error)
    lowered = text.lower()
    if "running low on memory" in lowered or "memory monitor" in lowered or "outofmemoryerror" in lowered:
        return OUT_OF_MEMORY  # Ray's memory monitor names itself; the generic exit text only lists OOM as a guess
    if "ray.kill" in text:
        return KILLED
    if "its node has died" in lowered or "node died" in lowered or "node was removed" in lowered:
        return NODE_LOST
    if any(k in lowered for k in ("socket closed", "connection error", "unexpectedly", "unavailable", "sigkill")):
        return PROCESS_LOST
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(error).__name__)
    return first[:120]


def ray_worker_exit(pid: int | None, node_id: str | None) -> str | None:
    """How Ray's record says the worker process `pid` on `node_id` ended (its GCS worker table's exit type, e.g.
    NODE_OUT_OF_MEMORY, SYSTEM_ERROR), or None: still alive, no record, or the table unreadable (an internal Ray
    API, ray._private.state, so any change in it reads as "no record")."""
    if pid is None:
        return None
    try:
        from ray._private.state import state
        from ray.core.generated import common_pb2, gcs_pb2

        for raw in state._connect_and_get_accessor().get_worker_table():
            worker = gcs_pb2.WorkerTableData.FromString(raw)
            if worker.pid == pid and not worker.is_alive:
                if not node_id or worker.worker_address.node_id.hex() == node_id:
                    return common_pb2.WorkerExitType.Name(worker.exit_type)
    except Exception:
        return None
    return None


def ray_exit_cause(pid: int | None, node_id: str | None) -> str | None:
    """OUT_OF_MEMORY when Ray's memory monitor killed the worker process `pid` (exit type NODE_OUT_OF_MEMORY).

    Why: a restartable actor killed by the monitor mid-call fails the call with `ActorUnavailableError: ... The actor
    was restarted`, which names no cause (benchmarks/ray_oom_cause.py); Ray's worker table keeps the exit type."""
    return OUT_OF_MEMORY if ray_worker_exit(pid, node_id) == "NODE_OUT_OF_MEMORY" else None


def one_line(error: BaseException, limit: int = 300) -> str:
    """`Type: first line of the message`, cut to `limit` characters: what a batch job records as its error."""
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    text = f"{type(error).__name__}: {first}" if first else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def death_message(role: str, cause: str, restarting: bool) -> str:
    """`{role} actor died: {cause}; restarting` (or `; not restarting`): what callers and batch jobs are told."""
    return f"{role} actor died: {cause}; {'restarting' if restarting else 'not restarting'}"


class FaultBook:
    """Fault bookkeeping, mixed into `Router`: an actor lost (taken out of placement, a prefill actor's index entries
    and claims removed), watched while Ray restarts it, admitted again as a new incarnation; holders probed after a
    failed read; stale index entries swept."""

    def _kind(self, slot: ActorSlot) -> str:
        return "prefill" if slot in self.prefill else "decode"

    def _lost(self, slot: ActorSlot, why: object, dead: bool = True) -> str:
        """Take `slot` out of placement; a prefill actor's index entries and claims go too (its KV is unreachable).
        `why`: the Ray error (its dump is logged here, once) or a reason. A restartable actor is watched until its
        new incarnation answers. Returns the one-line message for the caller (`decode actor died: ...`)."""
        kind = self._kind(slot)
        cause = death_cause(why) if isinstance(why, BaseException) else str(why)
        note = death_note(self.index.r, self.index.prefix, slot.name, slot.pid) if dead else None
        if note:  # the incarnation ended itself and said why (its memory limit: cluster/common/memory_limit.py)
            cause = note["cause"]
        elif dead and cause == PROCESS_LOST:  # Ray's error names no cause; its worker table may (memory monitor)
            cause = ray_exit_cause(slot.pid, slot.node) or cause
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
            self._spawn(self._watch, slot, name=f"readmit-{slot.name}")
        if was != UP:
            return message
        if dead:
            metrics.record_actor_death(kind, cause)
            log.error("%s", message.replace(f"{kind} actor", f"{kind} actor {slot.name}", 1))
            if note:
                log.info("actor %s (pid %s) recorded before it ended: %s", slot.name, slot.pid, note["detail"])
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
                if self._closing.wait(READMIT_POLL_S):
                    break  # closing: no Ray call after close() (Ray may be shut down next)
                ref = control(slot.handle.info).remote()
        with self._lock:
            slot.watching = False
            if info is None and not self._closing.is_set():
                slot.state = DEAD
            self._placeable.notify_all()
        if self._closing.is_set():
            return
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
            self._spawn(self._readmitted, kind, slot, name=f"rejoin-{slot.name}")

    def _readmitted(self, kind: str, slot: ActorSlot) -> None:
        if self._closing.is_set():
            return
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
