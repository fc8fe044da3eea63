"""What the router knows of each actor (`ActorSlot`: load, recent chunks, state, incarnation) and the states an actor
passes through; the calls sent to an actor's control concurrency group."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import ray

AFFINITY_MEMORY = 4096  # chunk ids remembered per decode actor (what it has fetched recently)
CONTROL = "control"  # the actors' concurrency group for status/cancel: answered even when every job thread is busy
UP, DOWN, DEAD = "up", "down", "dead"  # DOWN: did not answer a probe (may come back); DEAD: Ray says it died
RESTARTING = "restarting"  # died, and Ray restarts it (max_restarts): placed again once its new incarnation answers
RESTARTED_UNSEEN = "restarted while idle"  # the cause when only a new pid tells of a death
# what a call to a dead actor raises: its process died (killed, crashed, node lost), or Ray's memory monitor killed it
ACTOR_GONE = (ray.exceptions.RayActorError, ray.exceptions.OutOfMemoryError)


@dataclass
class ActorSlot:
    name: str
    node: str
    handle: object  # ray.actor.ActorHandle
    max_queued: int
    batch: int = 1  # jobs the actor runs at once (a decode actor's max batch)
    inflight: int = 0
    recent: OrderedDict = field(default_factory=OrderedDict)  # chunk ids this decode actor fetched
    state: str = UP
    pid: int | None = None  # the process of the incarnation last seen answering
    restartable: bool = False  # Ray restarts it after a death (started with max_restarts > 0)
    restarts: int = 0  # new incarnations admitted
    fault: dict | None = None  # the last death or silence: {"cause", "at" (time.time())}
    watching: bool = False  # a watcher thread waits for it to answer again

    @property
    def alive(self) -> bool:
        return self.state == UP

    def remember(self, cids: list[str]) -> None:
        for cid in cids:
            self.recent[cid] = None
            self.recent.move_to_end(cid)
        while len(self.recent) > AFFINITY_MEMORY:
            self.recent.popitem(last=False)


def control(method):
    """`actor.method` sent to the control concurrency group (answers while jobs occupy the default group)."""
    return method.options(concurrency_group=CONTROL)
