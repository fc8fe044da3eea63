"""One short cause for an actor's death, from the Ray error that reported it, and the one-line message a client or
a batch job sees (`decode actor died: out of memory; restarting`).

Why: Ray's errors carry a multi-line dump (the worker's exit detail, a list of common causes that always mentions
the OOM killer, log hints). A client needs the cause in one line; the dump goes to the log, once, where it is read.
"""

from __future__ import annotations

import ray

OUT_OF_MEMORY = "out of memory"
PROCESS_LOST = "process lost (killed or crashed)"
KILLED = "killed by ray.kill"
NODE_LOST = "node lost"


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
