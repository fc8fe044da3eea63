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


def one_line(error: BaseException, limit: int = 300) -> str:
    """`Type: first line of the message`, cut to `limit` characters: what a batch job records as its error."""
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    text = f"{type(error).__name__}: {first}" if first else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def death_message(role: str, cause: str, restarting: bool) -> str:
    """`{role} actor died: {cause}; restarting` (or `; not restarting`): what callers and batch jobs are told."""
    return f"{role} actor died: {cause}; {'restarting' if restarting else 'not restarting'}"
