"""What the reliability tests share: a multi-node `ray.cluster_utils.Cluster` on loopback whose nodes carry the
prefill/decode role resources and detect a removed node within ~2 s, and the cluster config for it."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from pdllm.cluster.bootstrap import DECODE_RESOURCE, PREFILL_RESOURCE, loopback_only
from pdllm.cluster.config import ClusterConfig
from ray.cluster_utils import Cluster

from pdllm.method import MethodConfig

# a removed node is declared dead within ~2 s instead of Ray's default ~30 s
FAST_FAILURE_DETECTION = {
    "health_check_initial_delay_ms": 500,
    "health_check_period_ms": 500,
    "health_check_timeout_ms": 500,
    "health_check_failure_threshold": 3,
}


def node_args(**kw) -> dict:
    return {"num_cpus": 1, "node_ip_address": "127.0.0.1", **kw}


@contextmanager
def role_nodes(prefill: int, decode: int) -> Iterator[tuple[Cluster, dict, dict]]:
    """A head (router, batch worker) plus `prefill` and `decode` one-CPU role nodes; yields the cluster and the
    prefill and decode nodes by node id. Shut down on exit."""
    loopback_only()
    cluster = Cluster(
        initialize_head=True,
        head_node_args=node_args(include_dashboard=False, _system_config=FAST_FAILURE_DETECTION),
    )
    try:
        prefill_nodes = [cluster.add_node(**node_args(resources={PREFILL_RESOURCE: 1})) for _ in range(prefill)]
        decode_nodes = [cluster.add_node(**node_args(resources={DECODE_RESOURCE: 1})) for _ in range(decode)]
        yield cluster, {n.node_id: n for n in prefill_nodes}, {n.node_id: n for n in decode_nodes}
    finally:
        cluster.shutdown()


def one_actor_per_node(model_dir: str, address: str, method: MethodConfig, prefill: int, decode: int, **kw):
    """ClusterConfig with one actor on each role node (an actor asks for the node's one CPU)."""
    return ClusterConfig(
        model_dir=model_dir,
        ray_address=address,
        num_prefill_actors=prefill,
        num_decode_actors=decode,
        cpus_per_actor=1,
        chunk_size=method.chunk_size,
        top_k=method.top_k,
        keep_ratio=method.keep_ratio,
        store_capacity_bytes=64 << 20,
        **kw,
    )


def wait_until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
