"""The gRPC API served by the Ray cluster: `ClusterBackend.from_config(YAML)` (private Ray on loopback, embedded
Valkey, the tiny random model) behind the real ApiServer, called through pdllm.client.Client: Generate equals the
in-process sparse answer, GenerateStream reports prefill and every step, a batch is answered once per job, Health
renders as `pdllm status` shows it, a scrape shows the actors' metrics, deadlines and cancellation stop the decode
job on its actor. About 40 s on 2 cores (most of it starting Ray and the actors)."""

from __future__ import annotations

import json
import time
import urllib.request
import uuid
from pathlib import Path

import grpc
import pytest
import ray
from cluster_yaml import small_cluster_yaml
from pdllm.cluster.api.server import ApiServer, ApiServerConfig
from pdllm.cluster.batch.store import BatchStore
from pdllm.cluster.batch.worker import BatchWorker
from pdllm.cluster.cluster_backend import ClusterBackend
from pdllm.cluster.common.limits import ClusterLimits
from prometheus_client.parser import text_string_to_metric_families

from pdllm.client import ApiError, Client, document_ref
from pdllm.commands.status import render_status
from pdllm.engine import generate
from pdllm.errors import Cancelled, DeadlineExceeded
from pdllm.method import ChunkCache, MethodConfig
from pdllm.observability import metrics
from pdllm.sampler import SamplerConfig

TOKEN = "cluster-backend-token"
METHOD = MethodConfig(chunk_size=32, top_k=2, keep_ratio=1.0)
SMALL = {"gen_length": 16, "block_length": 16, "steps": 8}
DOC = " ".join(f"Record {i}: the code of box {i} is {1000 + 37 * i}." for i in range(6))
LONG = {"gen_length": 256, "block_length": 32, "steps": 256}  # long enough to be stopped halfway


@pytest.fixture(scope="module")
def backend(tiny_llada, tmp_path_factory):
    method = {"chunk_size": METHOD.chunk_size, "top_k": METHOD.top_k, "keep_ratio": METHOD.keep_ratio}
    path = small_cluster_yaml(tmp_path_factory.mktemp("cfg"), tiny_llada, **method)
    kv_dir = str(tmp_path_factory.mktemp("kv"))
    limits = ClusterLimits(call_timeout_s=60, start_timeout_s=90, redis_data_dir=kv_dir, log_json=True)
    b = ClusterBackend.from_config(path, limits)
    redis = b.handle.embedded_redis
    yield b
    b.close()
    assert not ray.is_initialized() and not redis.running  # close() stopped what from_config started
    assert b.health()["serving"] is False


@pytest.fixture(scope="module")
def store(backend):
    return BatchStore(backend.handle.embedded_redis.client(decode_responses=True, socket_timeout=10), prefix="tb:")


@pytest.fixture(scope="module")
def server(backend, store):
    cfg = ApiServerConfig(port=0, auth_token=TOKEN, max_running=2, max_waiting=8)
    with ApiServer(backend, cfg, store) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with Client(server.address, auth_token=TOKEN, timeout_s=60, retries=0) as c:
        yield c


def reference(lm, doc: str, question: str) -> str:
    sampler = SamplerConfig(**SMALL)
    return generate(lm, doc, question, sampler, mode="sparse", method=METHOD, cache=ChunkCache()).answer


def decode_status(backend) -> dict:
    return next(a for a in backend.router.status()["actors"] if a["kind"] == "decode")


@pytest.mark.timeout(180)
def test_generate_through_the_api_equals_the_in_process_sparse_answer(client, lm):
    question = "What is the code of box 4?"
    out = client.generate(DOC, question, SMALL, request_id="cb-1")
    assert out["answer"] == reference(lm, DOC, question)
    stats = out["stats"]
    assert stats["mode"] == "sparse" and stats["request_id"] == "cb-1"  # the cluster config's method by default
    assert stats["selected_chunks"] == METHOD.top_k and stats["prefill_chunks"] == stats["chunks"] > METHOD.top_k
    assert stats["decode_actor"].startswith("pdllm-decode-") and stats["queue_seconds"] >= 0
    again = client.generate(DOC, "What is the code of box 1?", {**SMALL, "top_k": 1})
    assert again["stats"]["prefill_chunks"] == 0 and again["stats"]["selected_chunks"] == 1  # request overrides


def actor_log_lines(request_id: str) -> list[dict]:
    """JSON log lines of this Ray session's workers (their stderr files) that carry `request_id`."""
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    lines = []
    for f in logs.glob("worker-*.err"):
        for line in f.read_text(errors="replace").splitlines():
            if request_id in line and line.startswith("{"):
                lines.append(json.loads(line))
    return lines


def test_the_request_id_of_the_grpc_call_is_on_the_prefill_and_decode_actors_log_lines(client):
    rid = "trace-" + uuid.uuid4().hex[:8]
    doc = DOC.replace("Record", "Entry")  # chunks no actor has encoded yet
    client.generate(doc, "What is the code of box 2?", SMALL, request_id=rid)
    want = {"pdllm.prefill_node.actor", "pdllm.decode_node.actor"}
    deadline = time.monotonic() + 20  # Ray writes workers' stderr to their files asynchronously
    while {line["logger"] for line in actor_log_lines(rid)} < want and time.monotonic() < deadline:
        time.sleep(0.2)
    lines = actor_log_lines(rid)
    assert want <= {line["logger"] for line in lines}, lines
    assert all(line["request_id"] == rid for line in lines)
    prefill = next(line for line in lines if line["logger"] == "pdllm.prefill_node.actor")
    assert "encoded" in prefill["msg"] and not prefill["msg"].startswith("prefill of 0 chunks")


@pytest.mark.timeout(120)
def test_stream_reports_prefill_then_every_step_then_the_final_answer(client, lm):
    question = "What is the code of box 2?"
    events = list(client.generate_stream(DOC, question, SMALL, request_id="cb-stream"))
    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["prefill", "prefill"] and kinds[-1] == "final"
    start, done = events[0], events[1]
    assert start["done_chunks"] == 0 and done["done_chunks"] == done["total_chunks"] == start["total_chunks"] > 0
    steps = [e for e in events if e["type"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, SMALL["steps"] + 1))
    assert all(e["total_steps"] == SMALL["steps"] for e in steps)
    final = events[-1]
    assert final["answer"] == steps[-1]["partial_text"] == reference(lm, DOC, question)
    assert final["request_id"] == "cb-stream"


@pytest.mark.timeout(120)
def test_a_batch_is_answered_once_per_job(client, backend, store, lm):
    jobs = [
        {"id": "inline", "context": DOC, "question": "What is the code of box 0?", "params": SMALL},
        {"id": "shared-1", "document_ref": document_ref(DOC), "question": "What is the code of box 3?"},
        {"id": "shared-2", "document_ref": document_ref(DOC), "question": "What is the code of box 5?"},
    ]
    worker = BatchWorker(store, backend, "cb-worker", concurrency=2, poll_s=0.05).start()
    try:
        reply = client.submit_batch("cb-batch", jobs, documents={document_ref(DOC): DOC}, default_params=SMALL)
        assert reply["created"]
        deadline = time.monotonic() + 90
        while client.get_batch("cb-batch")["state"] != "done" and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        worker.stop()
    results = {r["id"]: r for r in client.batch_results("cb-batch")}
    assert all(r["state"] == "done" and r["attempts"] == 1 for r in results.values())
    for job in jobs:
        assert results[job["id"]]["answer"] == reference(lm, DOC, job["question"])
        assert results[job["id"]]["stats"]["mode"] == "sparse"
    answered = store.answered("cb-batch")
    assert sorted(answered) == sorted(j["id"] for j in jobs) and store.refused_results("cb-batch") == 0


@pytest.mark.timeout(60)
def test_health_and_model_info_render_as_pdllm_status_shows_them(client, server):
    info = client.model_info()
    assert info["modes"] == ["sparse"] and info["backend"] == "ray-cluster" and info["family"] == "llada"
    assert info["defaults"] == {
        "mode": "sparse",
        "chunk_size": 32,
        "chunking": "text",
        "top_k": 2,
        "keep_ratio": 1.0,
        "keep_question_kv": False,
    }
    health = client.health()
    assert health["serving"] and health["backend"]["alive"] == {"prefill": 1, "decode": 1}
    assert health["streams"]["open"] == 0 and health["process"]["rss_bytes"] > 0
    text = render_status({"server": server.address, "model": info, **health})
    assert "backend ray-cluster" in text.splitlines()[0]
    assert "2/2 actors up" in text and "chunk index:" in text and "api_running" in text
    assert any(line.startswith("pdllm-prefill-") and " up " in line for line in text.splitlines())
    assert all("metrics" not in a for a in health["backend"]["actors"])  # snapshots feed /metrics, not Health


@pytest.mark.timeout(60)
def test_a_scrape_after_requests_shows_requests_steps_and_the_actors_prefill(client):
    port = metrics.start_metrics_server(0)
    try:
        client.generate(DOC * 2, "What is the code of box 6?", SMALL)  # new chunks: the prefill actor encodes
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
    finally:
        metrics.stop_metrics_servers()
    samples = {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples if not s.labels}
    labelled = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }
    assert labelled[("pdllm_request_seconds_count", (("outcome", "ok"),))] >= 1  # the servicer
    assert samples["pdllm_denoise_steps_total"] >= SMALL["steps"]  # the decode actor, through its snapshot
    assert samples["pdllm_prefill_chunks_total"] > 0  # the prefill actor
    assert labelled[("pdllm_chunk_cache_lookups_total", (("result", "miss"),))] > 0  # the router


@pytest.mark.timeout(120)
def test_deadline_and_cancellation_stop_the_job_on_the_decode_actor(backend, client):
    before = decode_status(backend)
    with pytest.raises(DeadlineExceeded, match="deadline"):
        backend.generate(DOC, "What is the code of box 3?", LONG, "cb-deadline", None, timeout_s=1.0)

    seen: list[dict] = []

    def leave(event: dict) -> None:
        seen.append(event)
        if event["type"] == "step" and event["step"] >= 2:
            raise Cancelled("caller left")

    with pytest.raises(Cancelled):
        backend.generate(DOC, "What is the code of box 4?", LONG, "cb-cancel", leave, timeout_s=60)
    assert [e["step"] for e in seen if e["type"] == "step"][:2] == [1, 2]
    deadline = time.monotonic() + 20
    while (after := decode_status(backend))["running"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert after["running"] == 0 and after["cancelled"] - before["cancelled"] == 2  # both stopped midway
    assert after["done"] - before["done"] == 2
    assert backend.router.status()["faults"]["cancelled_jobs"] >= 2
    with pytest.raises(ApiError) as err:  # through the API the same deadline is DEADLINE_EXCEEDED
        client.generate(DOC, "What is the code of box 2?", LONG, timeout_s=1.0)
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
