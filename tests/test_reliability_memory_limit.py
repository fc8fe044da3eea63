"""Reliability: the default deployment's actors killed by a memory limit mid-batch. The embedded default cluster (a
private local Ray with one prefill and one decode actor, the embedded Valkey, the bundled model, the default
ClusterConfig) runs with a per-actor memory limit (`actor_memory_limit_bytes`, 4 GiB here; the actors' working
set in this test stays under it). Mid-batch the decode actor is made to hold real, written memory past the
limit (the `hold_memory` drill, a leak on demand); its watchdog records the cause and ends the process, Ray restarts
it, the router re-runs the lost work on the new incarnation and names the cause `out of memory`. Then the same for
the prefill actor. Every job must end with exactly one result, equal to the in-process answer, and the next request
must be answered. About 2-3 minutes on 2 cores."""

from __future__ import annotations

import logging

import pytest
from pdllm.cluster.batch.store import BatchStore
from pdllm.cluster.cluster_backend import ClusterBackend
from pdllm.cluster.common.limits import ClusterLimits
from pdllm.cluster.common.node_memory import derived_refuse_fraction
from pdllm.cluster.router.faults import OUT_OF_MEMORY
from pdllm.cluster.router.slots import control
from pdllm.cluster.runtime import start_cluster
from reliability_cluster import wait_until
from test_reliability_restarts import CONFIG, PARAMS, actor_status, admitted_again, document, restarts, run_batch

from pdllm.assets import default_model_dir
from pdllm.engine import generate
from pdllm.method import ChunkCache
from pdllm.models.loader import load_model
from pdllm.observability import metrics
from pdllm.sampler import SamplerConfig

LIMIT = 4 << 30  # the decode actor's own working set in this test reached 3.0 GiB
MIB = 1 << 20


@pytest.fixture(scope="module")
def bundled():
    return load_model(default_model_dir())


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    limits = ClusterLimits(
        call_timeout_s=120,
        start_timeout_s=180,
        redis_data_dir=str(tmp_path_factory.mktemp("kv")),
        actor_memory_limit_bytes=LIMIT,
    )
    b = ClusterBackend(start_cluster(CONFIG, limits))
    yield b
    b.close()


def deaths(role: str) -> float:
    labels = {"role": role, "cause": OUT_OF_MEMORY}
    return metrics.REGISTRY.get_sample_value("pdllm_actor_deaths_total", labels) or 0.0


def push_past_the_limit_when(slot, busy, what: str) -> int:
    """Once `busy(status)` holds (work in flight on the actor), make it hold memory past its limit; returns the pid
    of the incarnation that is to end."""
    wait_until(lambda: busy(actor_status(slot)), 120, what)
    status = actor_status(slot)
    rss = status["process"]["rss_bytes"]
    print(f"\n{slot.name}: RSS {rss / MIB:.0f} MiB of its {status['memory_limit_bytes'] / MIB:.0f} MiB limit")
    assert status["memory_limit_bytes"] == LIMIT and rss < LIMIT - (256 * MIB)
    control(slot.handle.hold_memory).remote(LIMIT - rss + 256 * MIB)  # its end fails this call: not awaited
    return status["pid"]


@pytest.mark.timeout(600)
def test_decode_then_prefill_over_their_memory_limit_mid_batch_restart_out_of_memory_and_every_job_answered_once(
    backend, bundled, caplog
):
    caplog.set_level(logging.INFO, logger="pdllm.cluster.router")
    router = backend.router
    decode, prefill = router.decode[0], router.prefill[0]
    store = BatchStore.from_url(backend.handle.redis_url, prefix="memory-limit:")
    before = {role: (restarts(role), deaths(role)) for role in ("decode", "prefill")}
    for slot in (decode, prefill):  # the admission line is on by default, derived from Ray's threshold
        assert actor_status(slot)["node_memory_refuse_fraction"] == derived_refuse_fraction()

    # 1. the decode actor passes its limit while it runs jobs
    docs = [document("alpha", 60), document("beta", 60)]
    jobs = [
        {"id": f"d{i:02d}", "context": docs[i % 2], "question": f"What is the code of entry {i % 7}?", "params": PARAMS}
        for i in range(6)
    ]
    ended = {}
    busy = lambda s: s.get("running", 0) > 0  # noqa: E731
    kill = lambda: ended.update(decode=push_past_the_limit_when(decode, busy, "a decode job"))  # noqa: E731
    results = run_batch(backend, store, "oom-decode", jobs, kill, bundled)
    assert admitted_again(decode, ended["decode"]) and decode.restarts == 1
    assert sum(r["stats"]["failovers"] for r in results) >= 1  # the jobs in flight ran once more, on the new one

    # 2. the prefill actor passes its limit while it encodes new documents
    docs = [document(f"gamma{k}", 150) for k in range(4)]
    jobs = [
        {"id": f"p{i:02d}", "context": docs[i], "question": f"What is the code of entry {3 + i}?", "params": PARAMS}
        for i in range(4)
    ]
    busy = lambda s: s.get("inflight", 0) > 0  # noqa: E731
    kill = lambda: ended.update(prefill=push_past_the_limit_when(prefill, busy, "a prefill"))  # noqa: E731
    run_batch(backend, store, "oom-prefill", jobs, kill, bundled)
    wait_until(lambda: admitted_again(prefill, ended["prefill"]), 120, "the prefill actor admitted again")
    assert prefill.restarts == 1

    # 3. the next request is answered by the new incarnations
    question = "What is the code of entry 5?"
    out = backend.generate(docs[0], question, PARAMS, "after-oom")
    sampler = SamplerConfig(**PARAMS)
    expected = generate(bundled, docs[0], question, sampler, mode="sparse", method=CONFIG.method(), cache=ChunkCache())
    assert out["answer"] == expected.answer

    # 4. the cause is out of memory: in status, in the metrics, in one log line per death
    health = backend.health()
    assert health["serving"] and health["alive"] == {"prefill": 1, "decode": 1}
    rows = {a["kind"]: a for a in health["actors"]}
    lines = [r.getMessage() for r in caplog.records]
    for role, slot in (("decode", decode), ("prefill", prefill)):
        assert rows[role]["restarts"] == 1 and rows[role]["pid"] != ended[role]
        assert rows[role]["fault"]["cause"] == OUT_OF_MEMORY
        assert restarts(role) - before[role][0] == 1 and deaths(role) - before[role][1] == 1
        died = [m for m in lines if m.startswith(f"{role} actor {slot.name} died")]
        assert died == [f"{role} actor {slot.name} died: out of memory; restarting"], died
        why = [m for m in lines if m.startswith(f"actor {slot.name} (pid {ended[role]}) recorded before it ended")]
        assert len(why) == 1 and f"over its limit of {LIMIT // MIB} MiB (actor_memory_limit_bytes)" in why[0], why
        print(f"{died[0]}\n{why[0]}")
        assert actor_status(slot)["process"]["rss_bytes"] < LIMIT  # the new incarnation holds no leak
    print(f"router faults: {health['faults']}")
