"""Reliability, items 4 and 6: clients that misbehave, and many clients at once, against the real ApiServer over the
Ray cluster (`ClusterBackend.from_config`: private Ray on loopback, embedded Valkey, one prefill and one decode actor,
the tiny random model).

Disconnects: three gRPC clients cancel their streams after the second step and a fourth drops its TCP connection
without a word; a raw HTTP/2 client opens a stream whose receive window stays at zero (it never reads) next to a
unary call it never reads either. Afterwards every counter of work in flight, from the API server to the actors, is
back to zero (`in_flight`), the decode actor counts each of those jobs as cancelled midway, and the API counts each
call once. Load: 8 clients x 2 rounds of 32 requests, no errors, every answer equal to the in-process answer, and
nothing left in flight after each round (timing belongs to benchmarks/bench_load.py). About 35 s on 2 cores."""

from __future__ import annotations

import time

import pytest
import reliability_wire as wire
from cluster_yaml import small_cluster_yaml
from pdllm.cluster.api.server import ApiServer, ApiServerConfig
from pdllm.cluster.cluster_backend import ClusterBackend
from pdllm.cluster.common.limits import ClusterLimits

from pdllm.client import Client, generate_request
from pdllm.engine import generate
from pdllm.load_client import LoadRequest, run_round
from pdllm.method import ChunkCache, MethodConfig
from pdllm.sampler import SamplerConfig

TOKEN = "reliability-clients-token"
METHOD = MethodConfig(chunk_size=32, top_k=2, keep_ratio=1.0)
SMALL = {"gen_length": 16, "block_length": 16, "steps": 8}
LONG = {"gen_length": 512, "block_length": 32, "steps": 512}  # seconds of decoding: stopped long before its end
DOCS = [
    " ".join(f"Record {i}: the code of box {i} is {1000 + 37 * i}." for i in range(6)),
    " ".join(f"Shelf {i}: the book on it is volume {200 + 11 * i}." for i in range(6)),
]
STREAM = "/pdllm.v1.Pdllm/GenerateStream"
STALL_S = 0.5


@pytest.fixture(scope="module")
def backend(tiny_llada, tmp_path_factory):
    method = {"chunk_size": METHOD.chunk_size, "top_k": METHOD.top_k, "keep_ratio": METHOD.keep_ratio}
    path = small_cluster_yaml(tmp_path_factory.mktemp("cfg"), tiny_llada, **method)
    limits = ClusterLimits(call_timeout_s=60, start_timeout_s=90, redis_data_dir=str(tmp_path_factory.mktemp("kv")))
    b = ClusterBackend.from_config(path, limits)
    yield b
    b.close()


@pytest.fixture(scope="module")
def server(backend):
    cfg = ApiServerConfig(port=0, auth_token=TOKEN, max_running=4, max_waiting=32, stream_stall_s=STALL_S)
    with ApiServer(backend, cfg) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with Client(server.address, auth_token=TOKEN, timeout_s=60, retries=0) as c:
        yield c


def reference(lm, doc: str, question: str) -> str:
    sampler = SamplerConfig(**SMALL)
    return generate(lm, doc, question, sampler, mode="sparse", method=METHOD, cache=ChunkCache()).answer


def in_flight(health: dict) -> dict:
    """Everything a request holds while it runs, as the server's Health reports it: all zero when none runs."""
    backend = health["backend"]
    actors = {kind: [a for a in backend["actors"] if a["kind"] == kind] for kind in ("prefill", "decode")}
    return {
        "api open streams": health["streams"]["open"],
        "api stream worker threads": health["streams"]["workers"],
        "api running calls": health["admission"]["running"],
        "api queued calls": health["admission"]["waiting"],
        "router active requests": backend["active"],
        "router decode jobs in flight": backend["queues"]["decode"],
        "router prefill calls in flight": backend["queues"]["prefill"],
        "decode actor running jobs": sum(a["running"] for a in actors["decode"]),
        "prefill KV transfer streams": sum(a["transfer_streams"] for a in actors["prefill"]),
        "prefill collective KV pins": sum(a["collective_pinned"] for a in actors["prefill"]),
    }


def settled(client: Client, timeout_s: float = 30.0) -> dict:
    """Health once nothing is in flight; fails naming what is still held after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        health = client.health()
        held = {k: v for k, v in in_flight(health).items() if v}
        if not held:
            return health
        if time.monotonic() > deadline:
            raise AssertionError(f"still held {timeout_s}s after the clients left: {held}")
        time.sleep(0.1)


def decode_actor(health: dict) -> dict:
    return next(a for a in health["backend"]["actors"] if a["kind"] == "decode")


def read_until_step(call, step: int) -> None:
    for event in call:
        if event.WhichOneof("event") == "step" and event.step.step >= step:
            return
    raise AssertionError("the stream ended before the step it was to be cancelled at")


@pytest.mark.timeout(120)
def test_clients_that_disconnect_mid_stream_leave_nothing_running(client, server, lm):
    before = settled(client)
    calls = [
        client.stub.GenerateStream(generate_request(DOCS[0], f"What is the code of box {i}?", LONG), timeout=60)
        for i in range(3)
    ]
    for call in calls:  # all three decode at once; each is cancelled by its client after its second step
        read_until_step(call, 2)
        call.cancel()
    raw = wire.RawH2(server.address)  # a fourth client vanishes: its TCP connection closes with no RST_STREAM
    raw.call(STREAM, wire.grpc_message(generate_request(DOCS[1], "Which volume?", LONG).SerializeToString()), TOKEN)
    deadline = time.monotonic() + 30
    while sum(kind == wire.DATA for kind, *_ in raw.read_frames(time.monotonic() + 0.2)) < 3:
        assert time.monotonic() < deadline, "the raw stream sent no events"
    raw.sock.close()

    after = settled(client)
    assert decode_actor(after)["cancelled"] - decode_actor(before)["cancelled"] == 4  # stopped midway on the actor
    assert decode_actor(after)["done"] - decode_actor(before)["done"] == 4
    requests = {k: after["requests"][k] - before["requests"][k] for k in before["requests"]}
    assert requests == {"cancelled": 4, "completed": 0, "failed": 0, "deadline_exceeded": 0, "invalid": 0}
    assert after["backend"]["faults"]["cancelled_jobs"] - before["backend"]["faults"]["cancelled_jobs"] == 4
    question = "What is the code of box 5?"
    assert client.generate(DOCS[0], question, SMALL)["answer"] == reference(lm, DOCS[0], question)


@pytest.mark.timeout(120)
def test_a_client_that_never_reads_is_cancelled_by_the_stall_watchdog(client, server, lm):
    before = settled(client)
    raw = wire.RawH2(server.address, window=0)  # grants the server no window on any stream, ever
    try:
        message = generate_request(DOCS[0], "What is the code of box 1?", LONG).SerializeToString()
        raw.call(STREAM, wire.grpc_message(message), TOKEN, stream=1)
        unary = generate_request(DOCS[1], "Which volume is on shelf 2?", SMALL).SerializeToString()
        raw.call("/pdllm.v1.Pdllm/Generate", wire.grpc_message(unary), TOKEN, stream=3)
        frames = raw.read_answer(1, 30)  # the server gives up on the stream once its write waited STALL_S
        assert wire.answered(frames, 1), "the server never ended the stream of a client that does not read"
        assert not any(kind == wire.DATA for kind, *_ in frames)  # nothing was ever sent past the zero window
        after = settled(client)
    finally:
        raw.close()
    assert after["streams"]["stalled"] - before["streams"]["stalled"] == 1
    assert decode_actor(after)["cancelled"] - decode_actor(before)["cancelled"] == 1  # its job stopped midway
    requests = {k: after["requests"][k] - before["requests"][k] for k in before["requests"]}
    assert requests == {"cancelled": 1, "completed": 1, "failed": 0, "deadline_exceeded": 0, "invalid": 0}
    question = "What is the code of box 4?"
    assert client.generate(DOCS[0], question, SMALL)["answer"] == reference(lm, DOCS[0], question)


@pytest.mark.timeout(180)
def test_eight_clients_two_rounds_every_answer_equals_the_in_process_answer(client, server, lm):
    questions = [f"What is the code of box {i}?" for i in range(4)] + [f"Which volume is on shelf {i}?" for i in (1, 3)]
    requests = [LoadRequest(DOCS[i % 2], questions[i % len(questions)], SMALL) for i in range(32)]
    expected = {(r.context, r.question): reference(lm, r.context, r.question) for r in requests}
    before = settled(client)
    for _ in range(2):
        result = run_round(server.address, requests, clients=8, auth_token=TOKEN, timeout_s=60)
        assert result.errors == []
        assert result.answers == [expected[(r.context, r.question)] for r in requests]
        settled(client)
    after = client.health()
    assert after["requests"]["completed"] - before["requests"]["completed"] == 64
    assert after["admission"]["refused"] == before["admission"]["refused"]
