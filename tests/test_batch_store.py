"""Batch job state in a real (embedded, password-protected) Valkey: idempotent submission, one answer per job,
retries, lease expiry, recovery of a restarted worker's jobs, cancellation, and persistence across a restart."""

from __future__ import annotations

import socket
import time

import pytest
from pdllm.cluster.api.params import DEFAULT_PARAMS
from pdllm.cluster.batch.store import BatchConflict, BatchNotFound, BatchStore, member
from pdllm.cluster.kv.redis_server import EmbeddedRedis

from pdllm.errors import InvalidRequest


def jobs(n: int, question: str = "q?") -> list[dict]:
    return [
        {"id": f"j{i}", "context": f"ctx {i}", "question": question, "params": dict(DEFAULT_PARAMS)} for i in range(n)
    ]


@pytest.fixture(scope="module")
def valkey(tmp_path_factory):
    with EmbeddedRedis(tmp_path_factory.mktemp("valkey")) as server:
        yield server


@pytest.fixture
def store(valkey, request):
    client = valkey.client(decode_responses=True, socket_timeout=5)
    prefix = f"t:{request.node.name}:"  # one namespace per test on the shared server
    return BatchStore(client, prefix=prefix, max_attempts=2)


def test_redis_requires_the_password(valkey):
    with socket.create_connection((valkey.host, valkey.port), timeout=5) as conn:
        conn.sendall(b"PING\r\n")
        assert conn.recv(100).startswith(b"-NOAUTH")


def test_submit_is_idempotent_and_conflicts_are_refused(store):
    status, created = store.submit("b1", jobs(3), {})
    assert created and status["total"] == 3 and status["pending"] == 3 and status["state"] == "pending"
    again, created = store.submit("b1", jobs(3), {})
    assert not created and again["total"] == 3
    assert store.r.llen(f"{store.p}pending") == 3  # nothing queued twice
    with pytest.raises(BatchConflict):
        store.submit("b1", jobs(3, question="other?"), {})
    with pytest.raises(BatchNotFound):
        store.status("nope")


def test_documents_are_stored_once_and_refs_checked(store):
    spec = [{"id": "a", "document_ref": "d" * 64, "question": "q?", "params": {}}]
    with pytest.raises(InvalidRequest):
        store.submit("b-doc", spec, {})
    store.submit("b-doc", spec, {"d" * 64: "shared document"})
    assert store.document("d" * 64) == "shared document"
    store.submit("b-doc2", [{**spec[0], "id": "b"}], {})  # the document is already there
    assert store.status("b-doc2")["total"] == 1


def test_claim_complete_answers_each_job_once(store):
    store.submit("b1", jobs(2), {})
    m, spec, attempt = store.claim("w1", lease_s=30)
    assert m == member("b1", "j0") and spec["context"] == "ctx 0" and attempt == 1
    assert store.status("b1")["running"] == 1
    assert store.complete(m, {"answer": "first", "stats": {"steps": 1}})
    assert not store.complete(m, {"answer": "second", "stats": {}})  # never answered twice
    assert store.refused_results("b1") == 1
    # the same answer again is the client's retry of a write whose reply was lost (a server restart): accepted,
    # neither refused nor answered a second time
    assert store.complete(m, {"answer": "first", "stats": {"steps": 1}})
    assert store.refused_results("b1") == 1 and store.answered("b1") == ["j0"]
    results, next_offset = store.results("b1", 0, 10)
    assert next_offset == -1
    assert results[0] == {"id": "j0", "state": "done", "attempts": 1, "answer": "first", "stats": {"steps": 1}}
    assert results[1]["state"] == "pending"
    store.r.rpush(f"{store.p}pending", m)  # a stray duplicate queue entry of a finished job...
    m2, _, _ = store.claim("w1", lease_s=30)
    assert m2 == member("b1", "j1")  # ...is skipped, not run again
    assert store.claim("w1", lease_s=30) is None
    status = store.status("b1")
    assert (status["done"], status["running"], status["pending"]) == (1, 1, 0)


def test_failures_retry_then_fail_and_bad_input_fails_at_once(store):
    store.submit("b1", jobs(2), {})
    m, _, _ = store.claim("w1", 30)
    assert store.fail(m, "w1", "backend unavailable", retry=True) == "requeued"
    m2, _, _ = store.claim("w1", 30)
    assert m2 == member("b1", "j1")
    assert store.fail(m2, "w1", "question too long", retry=False) == "failed"
    m3, _, attempt = store.claim("w1", 30)
    assert m3 == m and attempt == 2
    assert store.fail(m3, "w2", "not my job", retry=True) == "ignored"  # only the lease holder may fail it
    assert store.fail(m3, "w1", "unavailable again", retry=True) == "failed"  # max_attempts=2
    results, _ = store.results("b1", 0, 10)
    assert [(r["state"], r["error"]) for r in results] == [
        ("failed", "unavailable again"),
        ("failed", "question too long"),
    ]
    assert store.status("b1")["state"] == "done" and store.status("b1")["failed"] == 2


def test_restarted_worker_gets_its_leased_jobs_back(store):
    store.submit("b1", jobs(3), {})
    held = [store.claim("router-0", 300)[0] for _ in range(2)]  # then router-0 dies holding two jobs
    other = store.claim("router-1", 300)[0]
    assert store.requeue() == 0  # nothing expired yet
    assert store.requeue("router-0") == 2  # router-0 starts again: its old leases go back in line
    status = store.status("b1")
    assert (status["running"], status["pending"]) == (1, 2)
    got = [store.claim("router-0", 300)[0] for _ in range(2)]
    assert sorted(got) == sorted(held)
    assert store.job("b1", "j0")["attempts"] == "2"
    assert store.complete(other, {"answer": "x", "stats": {}})


def test_expired_lease_is_requeued_and_late_answer_is_kept_once(store):
    store.submit("b1", jobs(1), {})
    m, _, _ = store.claim("slow-worker", lease_s=0.2)
    time.sleep(0.3)
    assert store.requeue() == 1
    m2, _, attempt = store.claim("fast-worker", 30)
    assert m2 == m and attempt == 2
    assert store.complete(m, {"answer": "slow", "stats": {}})  # the slow worker finished after all
    assert not store.complete(m2, {"answer": "fast", "stats": {}})
    results, _ = store.results("b1", 0, 10)
    assert results[0]["answer"] == "slow"
    status = store.status("b1")
    assert (status["done"], status["running"], status["state"]) == (1, 0, "done")


def test_renew_keeps_a_lease_alive(store):
    store.submit("b1", jobs(1), {})
    m, _, _ = store.claim("w1", lease_s=0.3)
    time.sleep(0.2)
    assert store.renew("w1", [m], 30) == 1
    assert store.renew("w2", [m], 30) == 0
    time.sleep(0.2)
    assert store.requeue() == 0


def test_cancel_stops_pending_jobs_only(store):
    store.submit("b1", jobs(3), {})
    running, _, _ = store.claim("w1", 30)
    status = store.cancel("b1")
    assert status["state"] == "cancelled" and status["cancelled"] == 2 and status["running"] == 1
    assert store.claim("w1", 30) is None
    assert store.complete(running, {"answer": "kept", "stats": {}})
    with pytest.raises(BatchNotFound):
        store.cancel("nope")


def test_results_page_in_submission_order(store):
    store.submit("b1", jobs(5), {})
    first, nxt = store.results("b1", 0, 2)
    second, nxt2 = store.results("b1", nxt, 2)
    last, end = store.results("b1", nxt2, 2)
    assert [r["id"] for r in first + second + last] == [f"j{i}" for i in range(5)] and end == -1
    assert [b["batch_id"] for b in store.list()] == ["b1"]


def test_jobs_survive_a_redis_restart(tmp_path):
    server = EmbeddedRedis(tmp_path / "data").start()
    try:
        store = BatchStore(server.client(decode_responses=True, socket_timeout=5))
        store.submit("b1", jobs(2), {})
        m, _, _ = store.claim("router-0", 300)
        store.complete(m, {"answer": "a0", "stats": {}})
        store.claim("router-0", 300)  # leased when everything stops
        server.stop()
        server = EmbeddedRedis(tmp_path / "data", password=server.password).start()
        store = BatchStore(server.client(decode_responses=True, socket_timeout=5))
        assert store.requeue("router-0") == 1
        status = store.status("b1")
        assert (status["done"], status["pending"], status["running"]) == (1, 1, 0)
        m2, _, attempt = store.claim("router-0", 300)
        assert m2 == member("b1", "j1") and attempt == 2
        assert store.results("b1", 0, 1)[0][0]["answer"] == "a0"
    finally:
        server.stop()
