"""The cluster's status as the router sees it: each actor's answer to `status()` (or why it gave none), store usage,
index size, queue depths, request and fault counters. An actor that answers is placed again; one Ray reports dead is
taken out of placement."""

from __future__ import annotations

import time

import ray
from pdllm.cluster.router.slots import ACTOR_GONE, DEAD, DOWN, RESTARTING, ActorSlot, control

from pdllm.observability import metrics


class StatusReport:
    """Mixed into `Router` (which owns the slots, the index, the counters and the fault book)."""

    def status(self, timeout_s: float = 5.0) -> dict:
        """Actors, store usage, index size and queue depths (actors that do not answer in time say so). An actor
        that answers is up again; one that Ray reports dead is taken out of placement."""

        def ask(slots: list[ActorSlot], kind: str) -> list[dict]:
            refs = [None if s.state in (DEAD, RESTARTING) else control(s.handle.status).remote() for s in slots]
            live = [r for r in refs if r is not None]
            ready, _ = ray.wait(live, num_returns=len(live), timeout=timeout_s) if live else ([], [])
            out = []
            for s, ref in zip(slots, refs, strict=True):
                row = {"kind": kind, "role": kind, "name": s.name, "node": s.node}
                row.update(queue=s.inflight, queued=s.inflight, max_queued=s.max_queued)
                try:
                    if ref is None:
                        row["error"] = s.state
                    elif ref in ready:
                        row.update(ray.get(ref, timeout=0))
                        if s.state == DOWN or row.get("pid") != s.pid:  # back, or restarted between requests
                            self._admit(s, row.get("pid"))
                    else:
                        row["error"] = "no answer"
                except ACTOR_GONE as e:
                    row["error"] = type(e).__name__
                    self._lost(s, e)
                except ray.exceptions.RayError as e:
                    row["error"] = type(e).__name__
                row["alive"] = s.alive and "error" not in row
                row.update(state=s.state, restarts=s.restarts)
                if s.fault:
                    row["fault"] = {"cause": s.fault["cause"], "since_s": round(time.time() - s.fault["at"], 1)}
                metrics.set_actor_health(s.name, row["alive"])
                out.append(row)
            return out

        prefill, decode = ask(self.prefill, "prefill"), ask(self.decode, "decode")
        stores = [p for p in prefill if "used_bytes" in p]
        index_size = self.index.size()
        with self._lock:
            counts = {"completed": self.completed, "rejected": self.rejected, "failed": self.failed}
            counts.update(active=self.active, faults=dict(self.faults))
        return {
            "actors": prefill + decode,
            "store": {
                "used_bytes": sum(p["used_bytes"] for p in stores),
                "capacity_bytes": sum(p["capacity_bytes"] for p in stores),
                "chunks": sum(p["chunks"] for p in stores),
                "evictions": sum(p["evictions"] for p in stores),
            },
            "index_size": index_size,
            "index": {"chunks": index_size},
            "queues": {
                "prefill": sum(s.inflight for s in self.prefill),
                "decode": sum(s.inflight for s in self.decode),
                "prefill_capacity": sum(s.max_queued for s in self.prefill if s.alive),
                "decode_capacity": sum(s.max_queued for s in self.decode if s.alive),
            },
            **counts,
        }
