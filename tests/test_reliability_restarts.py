"""Reliability: the default deployment survives its own actors. The embedded default cluster (a private local Ray
with one prefill and one decode actor, the embedded Valkey, the bundled model, the default ClusterConfig) runs a
batch; mid-batch the decode actor's process is SIGKILLed, and in a second batch the prefill actor's. Ray restarts
each (max_restarts), the router admits the new incarnation again and runs the lost work once more on it. Every job
must end with exactly one result (the batch's answered-log in Redis), equal to the in-process answer, and the next
request must be answered. An actor over its memory budget refuses work with a one-line RESOURCE_EXHAUSTED-class
error instead of being killed. About 2-3 minutes on 2 cores."""

from __future__ import annotations

import logging
import os
import signal
from collections import Counter

import pytest
import ray
from pdllm.cluster.batch.store import BatchStore
from pdllm.cluster.batch.worker import BatchWorker
from pdllm.cluster.cluster_backend import ClusterBackend
from pdllm.cluster.common.limits import ClusterLimits
from pdllm.cluster.config import ClusterConfig
from pdllm.cluster.router.faults import (
    OUT_OF_MEMORY,
    PROCESS_LOST,
    death_cause,
    death_message,
    one_line,
    ray_exit_cause,
    ray_worker_exit,
)
from pdllm.cluster.router.slots import UP, control
from pdllm.cluster.runtime import start_cluster
from reliability_cluster import wait_until

from pdllm.assets import default_model_dir
from pdllm.engine import generate
from pdllm.errors import Busy
from pdllm.method import ChunkCache
from pdllm.models.loader import load_model
from pdllm.observability import metrics
from pdllm.sampler import SamplerConfig

PARAMS = {"gen_length": 32, "block_length": 32, "steps": 16}
CONFIG = ClusterConfig(model_dir=str(default_model_dir()))  # the default deployment: one prefill, one decode actor


def document(tag: str, n: int) -> str:
    return " ".join(f"Entry {i} of {tag}: the code is {1000 + 7 * i}." for i in range(n))


@pytest.fixture(scope="module")
def bundled():
    return load_model(default_model_dir())


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    limits = ClusterLimits(call_timeout_s=120, start_timeout_s=180, redis_data_dir=str(tmp_path_factory.mktemp("kv")))
    b = ClusterBackend(start_cluster(CONFIG, limits))
    yield b
    b.close()


def actor_status(slot) -> dict:
    try:
        return ray.get(control(slot.handle.status).remote(), timeout=5)
    except ray.exceptions.RayError:
        return {}


def restarts(role: str) -> float:
    return metrics.REGISTRY.get_sample_value("pdllm_actor_restarts_total", {"role": role}) or 0.0


def run_batch(backend, store: BatchStore, batch_id: str, jobs: list[dict], kill, bundled) -> list[dict]:
    """Run `jobs` as a batch three at a time; `kill()` fires mid-batch. Returns the results after checking that every
    job was answered exactly once, equal to the in-process sparse answer."""
    status, created = store.submit(batch_id, jobs, {})
    assert created and status["total"] == len(jobs)
    worker = BatchWorker(store, backend, f"{batch_id}-worker", concurrency=3, poll_s=0.02).start()
    try:
        kill()
        wait_until(lambda: store.status(batch_id)["state"] == "done", 300, f"{batch_id} to finish")
    finally:
        worker.stop()
    final = store.status(batch_id)
    assert final["done"] == len(jobs) and final["failed"] == 0 and final["running"] == 0, final
    answered = Counter(store.answered(batch_id))
    print(f"\n{batch_id} answered-log: {sum(answered.values())} entries for {len(answered)} of {len(jobs)} jobs")
    assert set(answered) == {j["id"] for j in jobs} and set(answered.values()) == {1}  # none lost, none twice
    assert store.refused_results(batch_id) == 0
    results, _ = store.results(batch_id, 0, len(jobs))
    sampler, method, references = SamplerConfig(**PARAMS), CONFIG.method(), {}
    for job, result in zip(jobs, results, strict=True):
        key = (job["context"], job["question"])
        if key not in references:
            references[key] = generate(bundled, *key, sampler, mode="sparse", method=method, cache=ChunkCache()).answer
        assert result["answer"] == references[key], job["id"]
    print(f"{batch_id} attempts: {Counter(r['attempts'] for r in results)}, failovers: "
          f"{sum(r['stats'].get('failovers', 0) for r in results)}")  # fmt: skip
    return results


def sigkill_when(slot, busy, what: str) -> int:
    """SIGKILL the actor's process once `busy(status)` holds (work in flight on it); returns the killed pid."""
    wait_until(lambda: busy(actor_status(slot)), 120, what)
    pid = slot.pid
    os.kill(pid, signal.SIGKILL)
    return pid


def admitted_again(slot, pid: int) -> bool:
    return slot.state == UP and slot.pid not in (None, pid)


@pytest.mark.timeout(600)
def test_decode_then_prefill_sigkilled_mid_batch_every_job_answered_once_and_served_after(backend, bundled, caplog):
    caplog.set_level(logging.INFO, logger="pdllm.cluster.router")
    router = backend.router
    decode, prefill = router.decode[0], router.prefill[0]
    store = BatchStore.from_url(backend.handle.redis_url, prefix="restarts:")
    before = {role: restarts(role) for role in ("decode", "prefill")}

    # 1. the decode actor dies while it runs jobs
    docs = [document("alpha", 60), document("beta", 60)]
    jobs = [
        {"id": f"d{i:02d}", "context": docs[i % 2], "question": f"What is the code of entry {i % 7}?", "params": PARAMS}
        for i in range(6)
    ]
    killed = {}
    kill = lambda: killed.update(decode=sigkill_when(decode, lambda s: s.get("running", 0) > 0, "a decode job"))  # noqa: E731
    results = run_batch(backend, store, "restart-decode", jobs, kill, bundled)
    assert admitted_again(decode, killed["decode"]) and decode.restarts == 1
    assert sum(r["stats"]["failovers"] for r in results) >= 1  # the jobs in flight ran once more, on the new one
    assert {r["stats"]["decode_actor"] for r in results} == {decode.name}

    # 2. the prefill actor dies while it encodes new documents (its store and index entries go with it)
    docs = [document(f"gamma{k}", 150) for k in range(4)]  # ~12 chunks each: prefills long enough to be hit
    jobs = [
        {"id": f"p{i:02d}", "context": docs[i], "question": f"What is the code of entry {3 + i}?", "params": PARAMS}
        for i in range(4)
    ]
    kill = lambda: killed.update(prefill=sigkill_when(prefill, lambda s: s.get("inflight", 0) > 0, "a prefill"))  # noqa: E731
    run_batch(backend, store, "restart-prefill", jobs, kill, bundled)
    wait_until(lambda: admitted_again(prefill, killed["prefill"]), 120, "the prefill actor admitted again")
    assert prefill.restarts == 1 and router.faults["prefill_failovers"] + router.faults["refetch_retries"] >= 1

    # 3. the next request is answered by the new incarnations, and nothing of the dead store is left in the index
    question = "What is the code of entry 5?"
    out = backend.generate(docs[0], question, PARAMS, "after-restarts")
    sampler = SamplerConfig(**PARAMS)
    expected = generate(bundled, docs[0], question, sampler, mode="sparse", method=CONFIG.method(), cache=ChunkCache())
    assert out["answer"] == expected.answer
    holders = router.index.holders()
    assert set(holders) <= {prefill.name} and sum(holders.values()) == actor_status(prefill)["chunks"]

    # 4. visible: status, metrics, one log line per death and per restart
    health = backend.health()
    assert health["serving"] and health["alive"] == {"prefill": 1, "decode": 1}
    rows = {a["kind"]: a for a in health["actors"]}
    for role in ("decode", "prefill"):
        assert rows[role]["restarts"] == 1 and rows[role]["state"] == UP and rows[role]["pid"] != killed[role]
        assert rows[role]["fault"]["cause"] == PROCESS_LOST and rows[role]["fault"]["since_s"] >= 0
        assert restarts(role) - before[role] == 1
    assert health["faults"]["actor_restarts"] == 2 and health["faults"]["actors_lost"] == 2
    for role, slot in (("decode", decode), ("prefill", prefill)):  # Ray's record of a SIGKILL: not out of memory
        assert (
            ray_worker_exit(killed[role], slot.node) == "SYSTEM_ERROR"
            and ray_exit_cause(killed[role], slot.node) is None
        )
    lines = [r.getMessage() for r in caplog.records]
    for slot in (decode, prefill):
        died = [m for m in lines if m.startswith(f"{router._kind(slot)} actor {slot.name} died")]
        back = [m for m in lines if f"actor {slot.name} is back as a new incarnation" in m]
        assert len(died) == 1 and "restarting" in died[0] and "\n" not in died[0], died
        assert len(back) == 1, back
        print(f"{died[0]}\n{back[0]}")
    print(f"router faults: {health['faults']}")


@pytest.mark.timeout(180)
def test_an_actor_over_its_memory_budget_refuses_work_in_one_line_and_serves_again_under_it(backend, bundled):
    decode = backend.router.decode[0]
    ray.get(decode.handle.set_memory_budget.remote(1 << 20), timeout=10)  # 1 MiB: far below any real RSS
    try:
        with pytest.raises(Busy) as refused:
            backend.generate(document("delta", 20), "What is the code of entry 2?", PARAMS, "over-budget")
    finally:
        ray.get(decode.handle.set_memory_budget.remote(0), timeout=10)
    message = str(refused.value)
    assert "\n" not in message and f"decode actor {decode.name} is over its memory budget" in message
    assert actor_status(decode)["memory_refused"] == 1
    out = backend.generate(document("delta", 20), "What is the code of entry 2?", PARAMS, "under-budget")
    assert out["answer"] and backend.health()["serving"]


def test_death_causes_are_one_short_line():
    oom = ray.exceptions.OutOfMemoryError("Task was killed due to the node running low on memory.\nMemory on ...")
    assert death_cause(oom) == OUT_OF_MEMORY
    generic = (
        "The actor died unexpectedly before finishing this task.\n\tclass_name: DecodeWorker\nWorker unexpectedly "
        "exits with a connection error code 2. Some common causes include: (1) the process was killed by the OOM "
        "killer due to high memory usage"
    )
    assert death_cause(generic) == PROCESS_LOST  # Ray's generic text lists the OOM killer only as a guess
    assert death_message("decode", OUT_OF_MEMORY, True) == "decode actor died: out of memory; restarting"
    assert one_line(RuntimeError("first line\nsecond line\n" + "x" * 400)) == "RuntimeError: first line"
