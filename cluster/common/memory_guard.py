"""Admission by memory: an actor whose resident set is above its configured budget refuses new work (ClusterBusy,
RESOURCE_EXHAUSTED / 429 at the API) instead of growing until Ray's memory monitor or the kernel kills it.

Why RSS: it is what both killers look at, and reading it (/proc/self/status) costs microseconds per job.
"""

from __future__ import annotations

from collections.abc import Callable

from pdllm.cluster.common.errors import ClusterBusy
from pdllm.cluster.common.proc_stats import process_stats


class MemoryBudgetExceeded(ClusterBusy):
    """The actor's RSS is over its budget: retry later (or on another actor)."""


def _rss() -> int | None:
    return process_stats()["rss_bytes"]


class MemoryGuard:
    def __init__(self, budget_bytes: int, rss: Callable[[], int | None] = _rss) -> None:
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        self.budget_bytes, self._rss = budget_bytes, rss
        self.refused = 0

    def admit(self, what: str) -> None:
        """Raise MemoryBudgetExceeded naming `what` when the process is over budget; a budget of 0 admits all."""
        if not self.budget_bytes:
            return
        rss = self._rss()
        if rss is not None and rss > self.budget_bytes:
            self.refused += 1
            raise MemoryBudgetExceeded(
                f"{what} is over its memory budget (RSS {rss / 2**20:.0f} MiB of {self.budget_bytes / 2**20:.0f} "
                "MiB, actor_memory_budget_bytes); retry later"
            )

    def set_budget(self, budget_bytes: int) -> None:
        """A new budget (drills and tests: an actor made to refuse work without filling the machine's memory)."""
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        self.budget_bytes = budget_bytes

    def status(self) -> dict:
        return {"memory_budget_bytes": self.budget_bytes, "memory_refused": self.refused}
