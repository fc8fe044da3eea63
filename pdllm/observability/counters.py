"""Counts of work a request does in this process (index round trips, chunk hashes, parameter checks), kept so a
test can assert how often the request path does each thing and a benchmark can print it. Process-local: an actor
reports its own in `status()["counters"]`."""

from __future__ import annotations

import threading
from collections import Counter

_lock = threading.Lock()
_counts: Counter[str] = Counter()


def count(name: str, n: int = 1) -> None:
    with _lock:
        _counts[name] += n


def snapshot() -> dict[str, int]:
    with _lock:
        return dict(_counts)


def difference(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    """What was counted between two snapshots (names that did not move left out)."""
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
