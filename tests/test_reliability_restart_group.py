"""Reliability: a restarted actor rejoins the collective KV group. The embedded default cluster (one prefill and one
decode actor, the bundled model) with `kv_transport: gloo`, so the two form a gloo group at start; the decode
actor's process is SIGKILLed, Ray restarts it, and once the router admits the new incarnation (learnt from its
status poll, nothing being in flight) the group is formed again with it: the next request's chunk KV reaches the
new decode actor over gloo, not gRPC. About 1-2 minutes on 2 cores."""

from __future__ import annotations

import os
import signal

import pytest
import ray
from pdllm.cluster.common.limits import ClusterLimits
from pdllm.cluster.config import ClusterConfig
from pdllm.cluster.router.faults import PROCESS_LOST
from pdllm.cluster.router.slots import RESTARTED_UNSEEN, UP, control
from pdllm.cluster.runtime import start_cluster
from reliability_cluster import wait_until

from pdllm.assets import default_model_dir
from pdllm.method import MethodConfig
from pdllm.sampler import SamplerConfig

SAMPLER = SamplerConfig(gen_length=16, block_length=16, steps=8)


@pytest.mark.timeout(400)
def test_a_restarted_decode_actor_rejoins_the_gloo_group_and_gets_kv_over_it(tmp_path):
    config = ClusterConfig(model_dir=str(default_model_dir()), kv_transport="gloo")
    limits = ClusterLimits(call_timeout_s=120, start_timeout_s=180, redis_data_dir=str(tmp_path))
    with start_cluster(config, limits) as handle:
        first = handle.collective
        assert first.spec is not None and first.spec.backend == "gloo", first.reason
        router, method = handle.router, MethodConfig(**vars(config.method()))
        doc = " ".join(f"Entry {i}: the code is {1000 + 7 * i}." for i in range(80))
        before = router.generate(doc, "What is the code of entry 3?", method, SAMPLER)
        decode = router.decode[0]
        pid = decode.pid
        os.kill(pid, signal.SIGKILL)
        # nothing is in flight: the router learns of the restart from status (a new pid), as `pdllm status` asks
        wait_until(lambda: router.status(timeout_s=2) and decode.pid != pid, 240, "the new incarnation admitted")
        assert decode.state == UP and decode.restarts == 1
        # a status call that reached the dying process saw the death; otherwise only the new pid tells of it
        assert decode.fault["cause"] in (PROCESS_LOST, RESTARTED_UNSEEN) and router.faults["actors_lost"] == 1
        wait_until(lambda: handle.collective is not first, 120, "the group formed again")
        assert handle.collective.spec is not None, handle.collective.reason
        group = ray.get(control(decode.handle.collective_status).remote(), timeout=10)
        assert group["backend"] == "gloo" and not group.get("broken"), group
        after = router.generate(doc, "What is the code of entry 3?", method, SAMPLER)
        assert after["answer"] == before["answer"]
        assert after["stats"]["fetched_paths"].get("gloo", 0) == after["stats"]["selected_chunks"] > 0
