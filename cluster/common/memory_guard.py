"""Admission by memory: an actor refuses new work (ClusterBusy, RESOURCE_EXHAUSTED / 429 at the API) while its
resident set is above its configured budget, or while its node's memory is fuller than the refuse line (by default
derived from Ray's memory monitor threshold: cluster/common/node_memory.py), instead of growing until Ray's memory
monitor or the kernel kills it.

Why RSS and the node's usage: they are what the killers look at, and reading them (/proc) costs microseconds a job.
"""

from __future__ import annotations

from collections.abc import Callable

from pdllm.cluster.common.errors import ClusterBusy
from pdllm.cluster.common.limits import ClusterLimits
from pdllm.cluster.common.node_memory import derived_refuse_fraction, node_memory
from pdllm.cluster.common.proc_stats import process_stats


class MemoryBudgetExceeded(ClusterBusy):
    """The actor's RSS is over its budget: retry later (or on another actor)."""


def _rss() -> int | None:
    return process_stats()["rss_bytes"]


class MemoryGuard:
    def __init__(
        self,
        budget_bytes: int,
        rss: Callable[[], int | None] = _rss,
        node_fraction: float = 0.0,
        node: Callable[[], tuple[int, int] | None] = node_memory,
    ) -> None:
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        if not 0.0 <= node_fraction <= 1.0:
            raise ValueError(f"node_fraction must be in [0, 1], got {node_fraction}")
        self.budget_bytes, self._rss = budget_bytes, rss
        self.node_fraction, self._node = node_fraction, node
        self.refused = 0

    @classmethod
    def from_limits(cls, limits: ClusterLimits) -> MemoryGuard:
        """The actor's guard: its RSS budget, and the node's refuse line (None in the limits: derived here, on the
        actor's node, from Ray's threshold in its environment)."""
        fraction = limits.node_memory_refuse_fraction
        return cls(
            limits.actor_memory_budget_bytes, node_fraction=derived_refuse_fraction() if fraction is None else fraction
        )

    def admit(self, what: str) -> None:
        """Raise MemoryBudgetExceeded naming `what` when the node's memory is over the refuse line or the process
        over its budget; a line or budget of 0 is off."""
        used = self._node() if self.node_fraction else None
        if used is not None and used[0] > self.node_fraction * used[1]:
            self.refused += 1
            raise MemoryBudgetExceeded(
                f"{what} refuses new work: its node's memory is {used[0] / used[1]:.0%} used, over "
                f"{self.node_fraction:.0%} (node_memory_refuse_fraction, below Ray's memory monitor); retry later"
            )
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
        used = self._node() if self.node_fraction else None
        return {
            "memory_budget_bytes": self.budget_bytes,
            "memory_refused": self.refused,
            "node_memory_refuse_fraction": self.node_fraction,
            "node_memory_used_fraction": used[0] / used[1] if used else None,
        }
