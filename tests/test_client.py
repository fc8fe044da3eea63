"""Client behaviour against real servers: UNAVAILABLE is retried with backoff until the server is up, other
statuses are not retried, deadlines bound the whole call; and `pdllm serve` as a real process."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import grpc
import openai
import pytest
from pdllm.cluster.api.in_process import InProcessBackend
from pdllm.cluster.api.server import ApiServer, ApiServerConfig
from pdllm.cluster.kv.redis_server import free_port

from pdllm.client import ApiError, Client, generate_via_server

SMALL = {"gen_length": 8, "block_length": 8, "steps": 8}


@pytest.fixture(scope="module")
def backend(tiny_llada):
    b = InProcessBackend.from_directory(str(tiny_llada), name="tiny")
    yield b
    b.close()


def test_unavailable_is_retried_until_the_server_starts(backend):
    """The client fails with UNAVAILABLE (nothing listens), backs off, and is answered once the server is up: the
    server starts inside the client's third backoff, so the retries before it are certain, not a matter of time."""
    port = free_port()
    pauses: list[float] = []
    servers: list[ApiServer] = []

    def sleep(pause: float) -> None:
        pauses.append(pause)
        if len(pauses) == 3:  # three attempts have failed: start the server
            servers.append(ApiServer(backend, ApiServerConfig(port=port)).start())
        time.sleep(pause)  # really waits: gRPC's channel reconnects on its own backoff, not on this call

    try:
        with Client(
            f"127.0.0.1:{port}", timeout_s=30, retries=200, backoff_s=0.05, max_backoff_s=0.2, sleep=sleep
        ) as c:
            reply = c.generate("context", "q?", SMALL)
        assert reply["stats"]["steps"] == 8 and len(pauses) >= 3
        assert all(0 <= p <= 0.2 for p in pauses)  # full-jitter backoff under its cap
        assert servers[0].servicer.counters["completed"] == 1  # answered once, by the server started late
    finally:
        for server in servers:
            server.stop(0)


def test_unavailable_gives_up_within_the_deadline():
    """With a clock that moves only when the client sleeps: it retries, and gives up before a pause would cross
    its 1 s deadline (not after its 100 retries)."""
    port = free_port()
    now = [0.0]
    pauses: list[float] = []

    def sleep(pause: float) -> None:
        pauses.append(pause)
        now[0] += pause

    client = Client(f"127.0.0.1:{port}", timeout_s=1.0, retries=100, backoff_s=0.05, clock=lambda: now[0], sleep=sleep)
    with client as c, pytest.raises(ApiError) as err:
        c.health()
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    assert 1 <= len(pauses) < 100 and sum(pauses) <= 1.0  # gave up on the deadline, within it


def test_other_errors_are_not_retried(backend):
    with ApiServer(backend, ApiServerConfig(port=0)) as server:
        with Client(server.address, timeout_s=20, retries=5) as c:
            with pytest.raises(ApiError) as err:
                c.generate("context", "", SMALL)
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert server.servicer.counters["invalid"] == 1  # one attempt reached the server


def test_generate_via_server_returns_answer_and_stats(backend):
    with ApiServer(backend, ApiServerConfig(port=0, auth_token="t0k")) as server:
        out = generate_via_server(server.address, "The key is 7.", "Key?", SMALL, auth_token="t0k", timeout_s=30)
    assert set(out) == {"request_id", "answer", "stats"}
    assert {"prefill_chunks", "reused_chunks", "selected_chunks", "steps"} <= set(out["stats"])
    json.dumps(out)  # what `pdllm generate --server --json` prints


def read_until_serving(proc: subprocess.Popen, timeout_s: float) -> str:
    """What the server printed up to its "serving on" line (or until it exited or the time ran out)."""
    lines, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "serving on" in line:
            break
    return "".join(lines)


def scrape(server_output: str) -> str:
    """GET the /metrics URL the server printed."""
    url = re.search(r"metrics on (http://\S+)", server_output).group(1)
    with urllib.request.urlopen(url, timeout=10) as reply:
        return reply.read().decode()


def test_pdllm_serve_process(tiny_llada, tmp_path):
    """The real command: prints a fresh token once, serves with it (and batch jobs), stops on SIGTERM."""
    port = free_port()
    cmd = [sys.executable, "-m", "pdllm.cli", "serve", "--in-process", "--model", str(tiny_llada)]
    cmd += ["--port", str(port), "--data-dir", str(tmp_path), "--device", "cpu", "--metrics-port", "0"]
    env = {k: v for k, v in os.environ.items() if k != "PDLLM_AUTH_TOKEN"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        text = read_until_serving(proc, 60)
        token = re.search(r"auth token .*: (\S+)", text).group(1)
        with Client(f"127.0.0.1:{port}", auth_token=token, timeout_s=30) as c:
            assert c.generate("The key is 7.", "Key?", SMALL)["stats"]["steps"] == 8
            assert re.search(r'pdllm_request_seconds_count\{[^}]*outcome="ok"[^}]*\} 1\.0', scrape(text))
            c.submit_batch("b1", [{"id": "a", "context": "c", "question": "q?", "params": SMALL}])
            deadline = time.monotonic() + 30
            while c.get_batch("b1")["state"] != "done" and time.monotonic() < deadline:
                time.sleep(0.1)
            assert c.get_batch("b1")["done"] == 1
        with Client(f"127.0.0.1:{port}", auth_token="wrong", timeout_s=5, retries=0) as c:
            with pytest.raises(ApiError):
                c.health()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0
        assert token not in out + err  # printed once at start, never again
        assert (tmp_path / "valkey" / "password").stat().st_mode & 0o077 == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.timeout(240)
def test_pdllm_serve_embedded_cluster_process(tiny_llada, tmp_path):
    """The default mode: an embedded cluster behind the API; one scrape shows the actors' prefill and fetch metrics."""
    port, http_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "pdllm.cli", "serve", "--model", str(tiny_llada), "--port", str(port), "--no-batch"]
    cmd += ["--data-dir", str(tmp_path), "--metrics-port", "0", "--auth-token", "t0k", "--log-json"]
    cmd += ["--http-port", str(http_port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        text = read_until_serving(proc, 180)
        assert "embedded: local Ray, embedded Valkey" in text, text
        assert "actors ready 2/2" in text and f"HTTP API on http://127.0.0.1:{http_port}/v1" in text, text
        with Client(f"127.0.0.1:{port}", auth_token="t0k", timeout_s=120) as c:
            out = c.generate("The pass key is 71432. " * 8, "Key?", {**SMALL, "chunk_size": 32, "top_k": 2})
            assert out["stats"]["decode_actor"].startswith("pdllm-decode-") and out["stats"]["prefill_chunks"] >= 2
        # the HTTP API on the cluster: a document asked twice through chat is prefilled once
        document = " ".join(f"Record {i}: the code of item {i} is {(i * 7919) % 10000}." for i in range(12))
        knobs = {"chunk_size": 32, "top_k": 2, "block_length": 8}
        with openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="t0k", max_retries=0) as oai:
            model = oai.models.list().data[0].id
            asked = [
                oai.chat.completions.create(
                    model=model,
                    messages=[{"role": "user", "content": document}, {"role": "user", "content": question}],
                    max_tokens=8,
                    extra_body=knobs,
                ).model_extra["pdllm"]
                for question in ("What is the code of item 3?", "What is the code of item 9?")
            ]
        assert asked[0]["decode_actor"].startswith("pdllm-decode-") and asked[0]["chunks"] >= 4
        assert asked[0]["prefill_chunks"] == asked[0]["chunks"] and asked[1]["prefill_chunks"] == 0
        assert asked[1]["reused_chunks"] == asked[1]["chunks"]
        page = scrape(text)
        ok = re.search(r'^pdllm_request_seconds_count\{[^}]*outcome="ok"[^}]*\} (\S+)$', page, re.M)
        assert ok and float(ok.group(1)) == 3, page[:2000]  # one gRPC and two HTTP requests
        chunks = re.search(r"^pdllm_prefill_chunks_total(?:\{[^}]*\})? (\S+)$", page, re.M)
        assert chunks and float(chunks.group(1)) >= 2, page[:2000]
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-2000:]
        assert "Token authentication is enabled" not in text + out + err  # Ray's notice on our private Ray: dropped
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
