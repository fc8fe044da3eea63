"""Closing the router waits for its helper threads. A readmit watcher that outlived close() made its next Ray call
after `ray.shutdown()`, and Ray's auto-init then joined the cluster from that thread (CI saw a test cluster refuse
to remove its head node because of it). A real local Ray and a real actor whose `info()` keeps failing, so the
watcher keeps asking."""

from __future__ import annotations

import threading

import pytest
import ray
from pdllm.cluster.bootstrap import loopback_only
from pdllm.cluster.common.limits import ClusterLimits
from pdllm.cluster.router.router import Router
from pdllm.cluster.router.slots import CONTROL, DOWN, ActorSlot

from pdllm.method import MethodConfig


@ray.remote(concurrency_groups={CONTROL: 1})
class Restarting:
    """Answers `info()` with an error, as an actor between incarnations does; counts the asks."""

    def __init__(self) -> None:
        self.asked = 0

    def info(self) -> dict:
        self.asked += 1
        raise RuntimeError("between incarnations")

    def asks(self) -> int:
        return self.asked


@pytest.fixture(scope="module")
def local_ray():
    loopback_only()
    ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="warning",
             _node_ip_address="127.0.0.1")  # fmt: skip
    yield
    ray.shutdown()


def watcher_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("readmit-")]


def test_close_waits_for_the_readmit_watcher_and_no_ray_call_follows(local_ray):
    actor = Restarting.remote()
    slot = ActorSlot(name="decode-0", node="n", handle=actor, max_queued=1, restartable=True)
    router = Router([], [slot], None, None, "m", MethodConfig(), ClusterLimits(restart_timeout_s=120))
    router._lost(slot, "test: no answer", dead=False)
    assert slot.state == DOWN and slot.watching and watcher_threads()
    for _ in range(1000):  # the watcher asks again after each failed answer: wait until it is in its loop
        if ray.get(actor.asks.options(concurrency_group=CONTROL).remote(), timeout=30) >= 3:
            break
    else:
        pytest.fail("the watcher did not ask the actor again")
    router.close()
    assert not watcher_threads(), "close() returned while a watcher could still call Ray"
    assert not slot.watching and slot.state == DOWN  # closing is not a death: the slot is not marked dead
    after = ray.get(actor.asks.options(concurrency_group=CONTROL).remote(), timeout=30)
    again = ray.get(actor.asks.options(concurrency_group=CONTROL).remote(), timeout=30)
    assert again == after  # nothing asks once closed
    router._lost(slot, "test: after close", dead=False)  # a loss reported after close starts no watcher
    assert not watcher_threads()
    ray.kill(actor)
