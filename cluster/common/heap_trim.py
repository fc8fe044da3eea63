"""Freed heap handed back to the system (glibc `malloc_trim`) after an actor's work, at most every few seconds.

Why: an actor's work frees most of what it allocates (activations, serialization buffers, fetched pieces), but glibc
keeps freed memory in its arenas, where it still counts in the RSS that admission, the memory limit and Ray's memory
monitor read. Trimming returns whole free pages; it costs tens of milliseconds per GiB released, so it runs on its own
thread, after work, rate-limited. Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
from collections.abc import Callable

from pdllm.cluster.common.proc_stats import process_stats

log = logging.getLogger(__name__)
MIN_INTERVAL_S = 2.0  # at most one trim this often, however much work ends


def _glibc_trim() -> Callable[[], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to call
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)


class HeapTrim:
    def __init__(self, min_interval_s: float = MIN_INTERVAL_S, trim: Callable[[], int] | None = None) -> None:
        self.min_interval_s = min_interval_s
        self._trim = trim if trim is not None else _glibc_trim()
        self._wake, self._stop = threading.Event(), threading.Event()
        self.trims = 0
        self.released_bytes = 0  # RSS before less RSS after, summed over trims
        if self._trim is not None:
            threading.Thread(target=self._run, name="heap-trim", daemon=True).start()

    def after_work(self) -> None:
        """Work ended: trim soon (on the trim thread, not this one)."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait()
            if self._stop.is_set():
                return
            self._wake.clear()
            self.trim_now()
            self._stop.wait(self.min_interval_s)  # work ending meanwhile sets _wake: one more trim after the wait

    def trim_now(self) -> int:
        """Trim once; returns the bytes the RSS fell by (0 where nothing can be trimmed)."""
        if self._trim is None:
            return 0
        before = process_stats()["rss_bytes"] or 0
        self._trim()
        released = max(0, before - (process_stats()["rss_bytes"] or 0))
        self.trims += 1
        self.released_bytes += released
        return released

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def status(self) -> dict:
        return {"heap_trims": self.trims, "heap_trim_released_bytes": self.released_bytes}
