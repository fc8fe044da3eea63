"""Batch jobs end to end: the CLI submits a JSONL file to a real server, a worker answers every job through the
in-process model, results export as JSONL; resubmission is a no-op; a restarted worker finishes what its
previous incarnation had claimed, and no job is answered twice."""

from __future__ import annotations

import json
import time

import grpc
import pytest
from pdllm.cluster.api.in_process import InProcessBackend
from pdllm.cluster.api.server import ApiServer, ApiServerConfig
from pdllm.cluster.batch.store import BatchStore
from pdllm.cluster.batch.worker import BatchWorker
from pdllm.cluster.kv.redis_server import EmbeddedRedis

from pdllm.cli import main
from pdllm.client import ApiError, Client, document_ref

TOKEN = "batch-test-token"
SMALL = {"gen_length": 8, "block_length": 8, "steps": 8}


@pytest.fixture(scope="module")
def backend(tiny_llada):
    b = InProcessBackend.from_directory(str(tiny_llada), name="tiny")
    yield b
    b.close()


@pytest.fixture(scope="module")
def valkey(tmp_path_factory):
    with EmbeddedRedis(tmp_path_factory.mktemp("valkey")) as server:
        yield server


@pytest.fixture
def store(valkey, request):
    return BatchStore(valkey.client(decode_responses=True, socket_timeout=5), prefix=f"t:{request.node.name}:")


@pytest.fixture
def server(backend, store):
    with ApiServer(backend, ApiServerConfig(port=0, auth_token=TOKEN), store) as srv:
        yield srv


def wait_finished(client: Client, batch_id: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get_batch(batch_id)
        if status["state"] in ("done", "cancelled") and not status["running"]:
            return status
        time.sleep(0.1)
    raise AssertionError(f"batch {batch_id} not finished: {status}")


def cli(capsys, *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(list(argv))
    return code, capsys.readouterr().out


def test_cli_submit_wait_results_and_resubmit(server, store, backend, tmp_path, capsys):
    doc = tmp_path / "report.txt"
    doc.write_text("The pass key is 71432. Remember it. " * 3)
    lines = [
        {"id": "inline", "context": "The sky is green here.", "question": "What colour is the sky?", "params": SMALL},
        {"id": "shared-1", "context_file": "report.txt", "question": "What is the pass key?", "params": SMALL},
        {
            "id": "shared-2",
            "context_file": "report.txt",
            "question": "Repeat the key.",
            "params": SMALL,
            "instruction": "Answer with the key only.\n",
        },  # fmt: skip
    ]
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps(line) + "\n" for line in lines))
    common = ("--server", server.address, "--auth-token", TOKEN, "--json")
    worker = BatchWorker(store, backend, "router-0", poll_s=0.05).start()
    try:
        code, out = cli(capsys, "batch", "submit", str(jobs), "--batch-id", "b-cli", "--wait", *common)
        assert code == 0
        submitted = json.loads(out)
        assert submitted["created"] and submitted["batch"]["state"] == "done" and submitted["batch"]["done"] == 3
        code, out = cli(capsys, "batch", "submit", str(jobs), "--batch-id", "b-cli", *common)
        assert code == 0 and json.loads(out)["created"] is False  # idempotent
        assert store.health()["queued_jobs"] == 0
        code, out = cli(capsys, "batch", "results", "b-cli", *common)
        rows = [json.loads(line) for line in out.splitlines()]
        assert [r["id"] for r in rows] == ["inline", "shared-1", "shared-2"]
        assert all(r["state"] == "done" and r["attempts"] == 1 and r["stats"]["steps"] == 8 for r in rows)
        assert rows[1]["stats"]["context_tokens"] == len(doc.read_bytes())
        assert rows[1]["stats"]["instruction_tokens"] == 0
        assert rows[2]["stats"]["instruction_tokens"] == len("Answer with the key only.\n")
        export = tmp_path / "out.jsonl"
        assert cli(capsys, "batch", "results", "b-cli", "-o", str(export), *common)[0] == 0
        assert [json.loads(line) for line in export.read_text().splitlines()] == rows
        code, out = cli(capsys, "batch", "status", "b-cli", *common)
        assert json.loads(out)["done"] == 3
        code, out = cli(capsys, "batch", "list", *common)
        assert [b["batch_id"] for b in json.loads(out)] == ["b-cli"]
        assert store.r.exists(f"{store.p}doc:{document_ref(doc.read_text())}")  # the shared file stored once
    finally:
        worker.stop()


def test_cli_errors_are_one_line(server, tmp_path, capsys):
    jobs = tmp_path / "bad.jsonl"
    jobs.write_text(json.dumps({"id": "j", "context": "c", "question": "q?", "params": {"steps": 0}}) + "\n")
    code = main(["batch", "submit", str(jobs), "--server", server.address, "--auth-token", TOKEN])
    err = capsys.readouterr().err
    assert code == 2 and "INVALID_ARGUMENT" in err and "job 'j'" in err and "steps" in err
    code = main(["batch", "status", "nope", "--server", server.address, "--auth-token", "wrong"])
    assert code == 2 and "UNAUTHENTICATED" in capsys.readouterr().err


def test_submit_validation_and_conflict_codes(server):
    with Client(server.address, auth_token=TOKEN, timeout_s=30, retries=0) as c:
        bad = [
            ("bad id!", [{"id": "a", "context": "c", "question": "q?"}], "batch_id"),
            ("b1", [], "at least one job"),
            ("b1", [{"id": "a", "context": "c", "question": "q?"}] * 2, "appears twice"),
            ("b1", [{"id": "a", "context": b"\xff", "question": "q?"}], "UTF-8"),
            ("b1", [{"id": "a", "context": "c", "question": ""}], "question is empty"),
            ("b1", [{"id": "a", "document_ref": "0" * 64, "question": "q?"}], "unknown document_ref"),
        ]
        for batch_id, jobs, needle in bad:
            with pytest.raises(ApiError) as err:
                c.submit_batch(batch_id, jobs)
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and needle in err.value.details
        with pytest.raises(ApiError) as err:
            c.submit_batch("b1", [{"id": "a", "document_ref": "0" * 64, "question": "q?"}], {"0" * 64: "not it"})
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "sha256" in err.value.details
        c.submit_batch("b1", [{"id": "a", "context": "c", "question": "q?", "params": SMALL}])
        with pytest.raises(ApiError) as err:
            c.submit_batch("b1", [{"id": "a", "context": "c", "question": "other?", "params": SMALL}])
        assert err.value.code == grpc.StatusCode.ALREADY_EXISTS
        with pytest.raises(ApiError) as err:
            c.get_batch("missing")
        assert err.value.code == grpc.StatusCode.NOT_FOUND
        assert c.health()["batches"]["redis"] is True


def test_restarted_worker_finishes_claimed_jobs_exactly_once(server, store, backend):
    jobs = [
        {"id": f"j{i}", "context": f"Fact {i}: the key is {i}.", "question": "Key?", "params": SMALL} for i in range(4)
    ]
    with Client(server.address, auth_token=TOKEN, timeout_s=30) as c:
        c.submit_batch("b-restart", jobs)
        claimed = [store.claim("router-0", lease_s=300)[0] for _ in range(2)]  # router-0 dies holding these
        assert c.get_batch("b-restart")["running"] == 2
        worker = BatchWorker(store, backend, "router-0", poll_s=0.05).start()  # router-0 starts again
        try:
            status = wait_finished(c, "b-restart")
        finally:
            worker.stop()
        assert worker.recovered == 2
        assert (status["done"], status["failed"], status["running"], status["pending"]) == (4, 0, 0, 0)
        results = list(c.batch_results("b-restart", page=3))
    assert [r["id"] for r in results] == [f"j{i}" for i in range(4)]
    attempts = {r["id"]: r["attempts"] for r in results}
    assert [attempts[m.split("|")[1]] for m in claimed] == [2, 2] and attempts["j3"] == 1
    for m in claimed:  # the dead incarnation's late answers change nothing
        assert not store.complete(m, {"answer": "late", "stats": {}})
    assert all(r["answer"] != "late" for r in store.results("b-restart", 0, 10)[0])


def test_cancel_leaves_pending_jobs_unanswered(server, store, capsys):
    jobs = [{"id": f"j{i}", "context": "c", "question": "q?", "params": SMALL} for i in range(3)]
    with Client(server.address, auth_token=TOKEN, timeout_s=30) as c:
        c.submit_batch("b-cancel", jobs)
    code, out = cli(capsys, "batch", "cancel", "b-cancel", "--server", server.address, "--auth-token", TOKEN, "--json")
    status = json.loads(out)
    assert code == 0 and status["state"] == "cancelled" and status["cancelled"] == 3
    assert store.claim("router-0", 30) is None


def test_bad_job_fails_without_retry_and_others_finish(server, store, backend):
    """A job the model refuses (context over the backend's token limit) fails once; its neighbours are answered."""
    small_backend = InProcessBackend(backend.lm, name="tiny", max_context_tokens=64)
    jobs = [
        {"id": "ok", "context": "short", "question": "q?", "params": SMALL},
        {"id": "too-long", "context": "x" * 200, "question": "q?", "params": SMALL},
    ]
    with Client(server.address, auth_token=TOKEN, timeout_s=30) as c:
        c.submit_batch("b-bad", jobs)
        worker = BatchWorker(store, small_backend, "router-1", poll_s=0.05).start()
        try:
            status = wait_finished(c, "b-bad")
        finally:
            worker.stop()
            small_backend.close()
        results = {r["id"]: r for r in c.batch_results("b-bad")}
    assert (status["done"], status["failed"]) == (1, 1)
    assert results["too-long"]["attempts"] == 1 and "more than the configured maximum" in results["too-long"]["error"]


def test_wait_exits_nonzero_when_a_job_failed_and_id_only_prints_the_id(server, store, backend, tmp_path, capsys):
    """`batch submit --wait` and `batch status --wait` exit 1 when a job failed; the worker publishes the jobs per
    state (pdllm_batch_jobs) and counts each job in pdllm_request_seconds by outcome."""
    from pdllm.observability import metrics

    def requests(outcome: str) -> float:
        return metrics.REGISTRY.get_sample_value("pdllm_request_seconds_count", {"outcome": outcome}) or 0.0

    small_backend = InProcessBackend(backend.lm, name="tiny", max_context_tokens=64)
    lines = [
        {"id": "ok", "context": "short", "question": "q?", "params": SMALL},
        {"id": "too-long", "context": "x" * 200, "question": "q?", "params": SMALL},
    ]
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps(line) + "\n" for line in lines))
    common = ("--server", server.address, "--auth-token", TOKEN)
    ok_before, error_before = requests("ok"), requests("error")
    code, out = cli(capsys, "batch", "submit", str(jobs), "--batch-id", "b-exit", "--id-only", *common)
    assert (code, out) == (0, "b-exit\n")
    worker = BatchWorker(store, small_backend, "router-2", poll_s=0.05).start()
    try:
        code, out = cli(capsys, "batch", "status", "b-exit", "--wait", *common)
        assert code == 1 and "failed=1" in out and "done=1" in out
        code, _ = cli(capsys, "batch", "submit", str(jobs), "--batch-id", "b-exit", "--wait", "--quiet", *common)
        assert code == 1  # already submitted; waiting on it reports the failure again
    finally:
        worker.stop()
        small_backend.close()
    assert requests("ok") == ok_before + 1 and requests("error") == error_before + 1
    jobs_in = lambda state: metrics.REGISTRY.get_sample_value("pdllm_batch_jobs", {"state": state})  # noqa: E731
    assert jobs_in("done") >= 1 and jobs_in("failed") >= 1 and jobs_in("pending") == 0
    assert store.state_counts()["failed"] == 1 and store.state_counts()["done"] == 1


def test_batch_jobs_are_bounded_by_the_model_length(short_llada, store):
    short = InProcessBackend.from_directory(str(short_llada), name="short")
    try:
        with ApiServer(short, ApiServerConfig(port=0, auth_token=TOKEN), store) as srv:
            with Client(srv.address, auth_token=TOKEN, timeout_s=30, retries=0) as c:
                job = {"id": "long", "context": "c", "question": "q?"}
                with pytest.raises(ApiError) as err:
                    c.submit_batch("b-long", [{**job, "params": {"gen_length": 512, "steps": 512}}])
                assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
                assert "job 'long': gen_length 512 is more than the model's maximum length of 256" in err.value.details
                assert c.submit_batch("b-ok", [{**job, "params": SMALL}])["created"]
    finally:
        short.close()
