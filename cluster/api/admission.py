"""Admission control for generation calls: a few run, a bounded queue waits in FIFO order, the rest are refused.

Refusing early (RESOURCE_EXHAUSTED) keeps latency bounded and lets clients back off, instead of piling up threads.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from pdllm.errors import Busy, Cancelled, DeadlineExceeded


class Admission:
    def __init__(self, max_running: int, max_waiting: int) -> None:
        if max_running < 1 or max_waiting < 0:
            raise ValueError("max_running must be >= 1 and max_waiting >= 0")
        self.max_running, self.max_waiting = max_running, max_waiting
        self._cond = threading.Condition()
        self._running = 0
        self._waiting: deque[object] = deque()
        self.refused = 0

    def snapshot(self) -> dict:
        with self._cond:
            return {"running": self._running, "waiting": len(self._waiting), "refused": self.refused}

    @contextmanager
    def slot(
        self,
        timeout_s: float | None = None,
        on_queued: Callable[[int], None] | None = None,
        alive: Callable[[], bool] | None = None,
    ) -> Iterator[float]:
        """Hold a running slot for the body; yields the seconds spent queued. `alive()` false: caller left."""
        start = time.monotonic()
        deadline = None if timeout_s is None else start + timeout_s
        with self._cond:
            if self._running >= self.max_running or self._waiting:
                if len(self._waiting) >= self.max_waiting:
                    self.refused += 1
                    raise Busy(
                        f"server busy: {self._running} running and {len(self._waiting)} queued (limit "
                        f"{self.max_waiting}); retry later"
                    )
                ticket = object()
                self._waiting.append(ticket)
                if on_queued is not None:
                    on_queued(len(self._waiting) - 1)
                try:
                    while self._waiting[0] is not ticket or self._running >= self.max_running:
                        left = None if deadline is None else deadline - time.monotonic()
                        if left is not None and left <= 0:
                            raise DeadlineExceeded(f"deadline passed after {timeout_s:.3f}s in the queue")
                        if alive is not None and not alive():
                            raise Cancelled("caller left while queued")
                        self._cond.wait(0.1 if left is None else min(left, 0.1))
                finally:
                    self._waiting.remove(ticket)
                    self._cond.notify_all()
            self._running += 1
        try:
            yield time.monotonic() - start
        finally:
            with self._cond:
                self._running -= 1
                self._cond.notify_all()
