"""A KV group of four ranks on CPU with gloo: one prefill actor (rank 0) and three decode actors (ranks 1-3) in one
group, formed by start_cluster with kv_transport "gloo" (the NCCL path runs the same code with backend "nccl").

Real parts throughout: the embedded local Ray, the embedded Valkey index, the bundled model in every actor, the
router. Concurrent requests spread over the three decode actors; every answer equals the in-process one and every
fetched chunk came over gloo from rank 0 (each decode rank received bytes: all three pairs carried KV). Then one
decode actor is killed while it runs jobs: the router runs them again on the others, every request is answered
exactly once, and the two survivors keep fetching over the group, which stays usable (only the dead peer is taken
off, where a transfer with it was under way). A group of more than two ranks posts single sends and receives and
connects every holder-receiver pair at join (`pair_ops`): this test runs that path. 60-80 s on 2 shared cores, most
of it starting Ray, the four actors and the in-process references.
"""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray
from pdllm.cluster.bootstrap import DECODE_RESOURCE, NAMESPACE, PREFILL_RESOURCE, loopback_only
from pdllm.cluster.common.limits import ClusterLimits
from pdllm.cluster.config import ClusterConfig
from pdllm.cluster.kv.redis_server import EmbeddedRedis
from pdllm.cluster.router.slots import control
from pdllm.cluster.runtime import start_cluster
from reliability_cluster import wait_until

from pdllm.assets import default_model_dir
from pdllm.engine import generate
from pdllm.method import ChunkCache, MethodConfig
from pdllm.models.loader import load_model
from pdllm.sampler import SamplerConfig

DECODE_ACTORS = 3
METHOD = MethodConfig(chunk_size=32, top_k=2, keep_ratio=1.0)
SAMPLER = SamplerConfig(gen_length=32, block_length=32, steps=16)  # long enough to be killed while running
DOCS = [
    " ".join(f"Vault {i}: the code word is {['amber', 'birch', 'cedar', 'dune'][i % 4]}{i}." for i in range(6)),
    " ".join(f"Locker {i}: the pass key is {31000 + 17 * i}." for i in range(6)),
]
FIRST_WAVE, SECOND_WAVE = 12, 4


def questions(n: int, offset: int) -> list[tuple[str, str]]:
    kinds = ("What is the code word of Vault {}?", "What is the pass key of Locker {}?")
    return [(DOCS[i % 2], kinds[i % 2].format((i + offset) % 6)) for i in range(n)]


def running(handle) -> int:
    try:
        return ray.get(control(handle.status).remote(), timeout=5)["running"]
    except ray.exceptions.RayError:
        return 0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    loopback_only()
    ray.init(
        address="local",  # a cluster of its own, never one another program started here
        num_cpus=2,
        resources={PREFILL_RESOURCE: 4, DECODE_RESOURCE: 4},
        namespace=NAMESPACE,
        include_dashboard=False,
        logging_level="warning",
        _node_ip_address="127.0.0.1",
    )
    redis = EmbeddedRedis(str(tmp_path_factory.mktemp("valkey"))).start()
    config = ClusterConfig(
        model_dir=str(default_model_dir()),
        redis_url=redis.url,
        num_prefill_actors=1,
        num_decode_actors=DECODE_ACTORS,
        cpus_per_actor=0.25,
        chunk_size=METHOD.chunk_size,
        top_k=METHOD.top_k,
        keep_ratio=METHOD.keep_ratio,
        decode_max_batch=8,
        kv_transport="gloo",
    )
    limits = ClusterLimits(
        call_timeout_s=60,
        start_timeout_s=90,
        max_queued_per_decode_actor=16,
        decode_reuse_fetched=False,  # every request fetches its chunks again, over the group
        collective_timeout_s=5.0,
        index_prefix=f"t-four-{uuid.uuid4().hex[:6]}",
    )
    try:
        with start_cluster(config, limits) as handle:
            yield handle
    finally:
        redis.stop()
        ray.shutdown()


@pytest.fixture(scope="module")
def references():
    lm = load_model(default_model_dir())
    keys = set(questions(FIRST_WAVE, 0))  # the second wave asks some of these again
    return {k: generate(lm, *k, SAMPLER, mode="sparse", method=METHOD, cache=ChunkCache()).answer for k in keys}


def assert_over_the_group(stats: dict) -> None:
    """Each selected chunk came over gloo, or was already in the actor's pool for another job of the same batch
    (pinned by it: fetched KV is not kept past its jobs here); none through Ray's same-node reads or gRPC."""
    assert set(stats["fetched_paths"]) <= {"gloo"} and stats["fetched_same_node"] == 0, stats
    assert stats["fetched_paths"].get("gloo", 0) + stats["fetched_local_cache"] == METHOD.top_k, stats


def ask_all(router, jobs: list[tuple[str, str]]) -> list[dict]:
    """Every job from its own client thread; each answer tagged with the job's request id."""
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(router.generate, d, q, METHOD, SAMPLER, f"r{i:02d}") for i, (d, q) in enumerate(jobs)]
        return [f.result() for f in futures]


@pytest.mark.timeout(110)
def test_four_rank_gloo_group_serves_three_decode_actors_and_outlives_one(cluster, references):
    spec = cluster.collective.spec
    assert spec is not None and spec.backend == "gloo", cluster.collective.reason
    prefill = ray.get(cluster.prefill_actors[0].info.remote(), timeout=10)["name"]
    decoders = [slot.name for slot in cluster.router.decode]
    assert [m.name for m in spec.members] == [prefill, *decoders]  # rank = position: prefill 0, decode 1..3
    assert {n: r["rank"] for n, r in cluster.collective.joined.items()} == {
        m.name: i for i, m in enumerate(spec.members)
    }
    router = cluster.router
    victim, survivors = router.decode[0], router.decode[1:]

    # one question per document first: each is prefilled once, before the wave asks about it concurrently
    for doc, question in questions(2, 0):
        assert router.generate(doc, question, METHOD, SAMPLER)["answer"] == references[(doc, question)]

    # the first wave: spread over the three decode actors; one of them is killed while it runs jobs
    jobs = questions(FIRST_WAVE, 0)
    box: list = []
    client = threading.Thread(target=lambda: box.append(ask_all(router, jobs)), name="first-wave")
    client.start()
    try:
        wait_until(lambda: running(victim.handle) > 0, 60, "a job running on the decode actor to kill")
        ray.kill(victim.handle, no_restart=True)
    finally:
        client.join(100)
    assert not client.is_alive() and box, "the first wave did not finish"
    first = box[0]
    answered = Counter(o["stats"]["request_id"] for o in first)
    assert answered == Counter(f"r{i:02d}" for i in range(FIRST_WAVE))  # every request answered exactly once
    for (doc, question), out in zip(jobs, first, strict=True):
        assert out["answer"] == references[(doc, question)], out["stats"]["request_id"]
        assert_over_the_group(out["stats"])
    faults = router.status()["faults"]
    assert faults["actors_lost"] == 1 and faults["decode_failovers"] >= 1
    assert sum(o["stats"]["failovers"] for o in first) == faults["decode_failovers"]
    served = Counter(o["stats"]["decode_actor"] for o in first)
    assert {s.name for s in survivors} <= set(served) <= set(decoders), served  # both survivors served

    # the second wave: only the survivors, still over gloo from rank 0; the group was never broken
    jobs = questions(SECOND_WAVE, 0)
    second = ask_all(router, jobs)
    for (doc, question), out in zip(jobs, second, strict=True):
        assert out["answer"] == references[(doc, question)]
        assert_over_the_group(out["stats"])
        assert out["stats"]["failovers"] == 0
    holder = ray.get(cluster.prefill_actors[0].collective_status.remote(), timeout=10)
    assert holder["broken"] is None and holder["rank"] == 0
    assert set(holder["peers_off"]) <= {victim.name}  # only a transfer to the dead rank can have failed
    for rank, slot in enumerate(survivors, start=2):
        status = ray.get(slot.handle.collective_status.remote(), timeout=10)
        assert status["rank"] == rank and status["broken"] is None and status["peers_off"] == {}
        assert status["received_bytes"] > 0
    assert holder["sent_bytes"] >= sum(
        ray.get(s.handle.collective_status.remote(), timeout=10)["received_bytes"] for s in survivors
    )
