"""A hard memory limit the project enforces on its own actors: a watchdog thread ends the process (SIGKILL, as the
kernel's OOM killer would) once its RSS passes `actor_memory_limit_bytes`, after recording the cause in Redis under
the incarnation's pid; Ray restarts the actor (max_restarts) and the router, finding the record, tells callers
`decode actor died: out of memory; restarting` instead of `process lost`.

Why our own: a container's or the kernel's OOM kill reaches Ray as a process that vanished, with no cause, and Ray's
memory monitor acts on the whole node's usage, so which worker it picks depends on everything else on the machine.
A limit per actor, set below both, ends the actor that grew, and says why.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable

import redis
from pdllm.cluster.common.errors import OUT_OF_MEMORY
from pdllm.cluster.common.proc_stats import process_stats

log = logging.getLogger(__name__)
POLL_S = 0.1  # RSS read this often (Ray's own memory monitor: every 0.25 s)
NOTE_TTL_S = 24 * 3600  # a death record outlives any restart the router waits for


def _note_key(prefix: str, name: str, pid: int) -> str:
    return f"{prefix}:death:{name}:{pid}"


def record_death(client: redis.Redis, prefix: str, name: str, pid: int, cause: str, detail: str) -> None:
    """Record why the incarnation `pid` of actor `name` is about to end (read by the router after the death)."""
    note = json.dumps({"cause": cause, "detail": detail, "at": time.time()})
    client.set(_note_key(prefix, name, pid), note, ex=NOTE_TTL_S)


def death_note(client: redis.Redis, prefix: str, name: str, pid: int | None) -> dict | None:
    """The record the incarnation `pid` of `name` left before it ended itself, if any (None on any Redis error)."""
    if pid is None:
        return None
    try:
        raw = client.get(_note_key(prefix, name, pid))
        return json.loads(raw) if raw else None
    except (redis.RedisError, ValueError):
        return None


def _rss() -> int | None:
    return process_stats()["rss_bytes"]


def _end_process() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class MemoryLimit:
    """Watches this process's RSS against `limit_bytes` (0: off); over it, `record(detail)` then `end()`."""

    def __init__(
        self,
        what: str,
        limit_bytes: int,
        record: Callable[[str], None],
        rss: Callable[[], int | None] = _rss,
        end: Callable[[], None] = _end_process,
        poll_s: float = POLL_S,
    ) -> None:
        if limit_bytes < 0:
            raise ValueError(f"limit_bytes must be >= 0, got {limit_bytes}")
        self.what, self.limit_bytes, self.poll_s = what, limit_bytes, poll_s
        self._record, self._rss, self._end = record, rss, end
        self._held: list[bytes] = []
        self._stop = threading.Event()
        self.fired = False

    @classmethod
    def for_actor(cls, role: str, name: str, limit_bytes: int, client: redis.Redis, prefix: str) -> MemoryLimit:
        """The limit of actor `name` (role "decode" or "prefill"), its record in the cluster's Redis; started."""
        pid = os.getpid()
        record = lambda detail: record_death(client, prefix, name, pid, OUT_OF_MEMORY, detail)  # noqa: E731
        return cls(f"{role} actor {name}", limit_bytes, record).start()

    def start(self) -> MemoryLimit:
        if self.limit_bytes:
            threading.Thread(target=self._run, name="memory-limit", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            if self.check():
                return

    def check(self) -> bool:
        """One reading: over the limit, record the cause, log one line, end the process; True if it fired."""
        rss = self._rss()
        if not self.limit_bytes or rss is None or rss <= self.limit_bytes:
            return False
        detail = (f"RSS {rss / 2**20:.0f} MiB over its limit of {self.limit_bytes / 2**20:.0f} MiB "
                  "(actor_memory_limit_bytes)")  # fmt: skip
        self.fired = True
        try:
            self._record(detail)
        except Exception as e:  # the process ends anyway; the router then sees only a lost process
            log.error("%s: could not record its out-of-memory end: %s", self.what, e)
        log.error("%s: %s: ending the process (out of memory)", self.what, detail)
        for handler in logging.getLogger().handlers:
            handler.flush()
        self._end()
        return True

    def hold(self, nbytes: int) -> None:
        """Drill: keep `nbytes` more of written memory (a leak on demand) to show the limit ending the actor."""
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        self._held.append(b"\x01" * nbytes)

    def status(self) -> dict:
        return {"memory_limit_bytes": self.limit_bytes}
