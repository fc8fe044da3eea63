"""Placement: which actor gets the next prefill call or decode job. Least-loaded prefill; decode by a free batch row
first, then the share of the request's chunks the actor already holds less its queue fill. Queues are bounded:
when every live actor of a kind is full, `ClusterBusy`; with none alive but some restarting, wait for one."""

from __future__ import annotations

import time

from pdllm.cluster.common.errors import ClusterBusy, ClusterUnavailable
from pdllm.cluster.router.slots import ActorSlot

from pdllm.observability import metrics


class Placement:
    """Mixed into `Router` (which owns `prefill`, `decode`, `limits`, `_lock`, `_placeable`, `_closing`)."""

    def _acquire(self, slot: ActorSlot) -> None:
        slot.inflight += 1
        self._publish_depth()

    def _release(self, slot: ActorSlot) -> None:
        with self._lock:
            slot.inflight -= 1
            self._publish_depth()

    def _publish_depth(self) -> None:
        metrics.set_queue_depth("prefill", sum(s.inflight for s in self.prefill))
        metrics.set_queue_depth("decode", sum(s.inflight for s in self.decode))

    def _open(
        self, slots: list[ActorSlot], kind: str, avoid: set[str], deadline: float | None = None
    ) -> list[ActorSlot]:
        """Open slots (the lock held); with none up but some coming back, wait for one (restart_timeout_s, or the
        request's deadline first)."""
        if not any(s.alive for s in slots) and any(s.watching for s in slots):
            wait = self.limits.restart_timeout_s
            if deadline is not None:
                wait = min(wait, max(0.0, deadline - time.monotonic()))
            self._placeable.wait_for(
                lambda: self._closing.is_set() or any(s.alive for s in slots) or not any(s.watching for s in slots),
                wait,
            )
        live = [s for s in slots if s.alive]
        if not live:
            faults = [s.fault["message"] for s in slots if s.fault]
            why = f": {faults[-1]}" if faults else ""
            raise ClusterUnavailable(f"no live {kind} actor is left (of {len(slots)}){why}; see `pdllm status`")
        open_slots = [s for s in live if s.inflight < s.max_queued]
        if not open_slots:
            self.rejected += 1
            raise ClusterBusy(f"all {len(live)} {kind} actors have full queues; retry later")
        return [s for s in open_slots if s.name not in avoid] or open_slots

    def pick_prefill(self, avoid: set[str] = frozenset(), deadline: float | None = None) -> ActorSlot:
        with self._lock:
            slot = min(self._open(self.prefill, "prefill", avoid, deadline), key=lambda s: s.inflight)
            self._acquire(slot)
            return slot

    def pick_decode(
        self, cids: list[str], holders: dict[str, str], avoid: set[str] = frozenset(), deadline: float | None = None
    ) -> ActorSlot:
        """An actor with a free batch row first (waiting behind a whole job costs more than any fetch saves), then
        score = share of the request's chunks the actor holds (cached, or on its node) - its queue fill."""
        unique = set(cids)
        with self._lock:
            open_slots = self._open(self.decode, "decode", avoid, deadline)

            def score(s: ActorSlot) -> float:
                held = sum(1 for c in unique if c in s.recent or holders.get(c) == s.node)
                return held / max(1, len(unique)) - s.inflight / s.max_queued

            free = lambda s: s.inflight < s.batch  # noqa: E731
            slot = max(open_slots, key=lambda s: (free(s), score(s), -s.inflight))
            self._acquire(slot)
            return slot
