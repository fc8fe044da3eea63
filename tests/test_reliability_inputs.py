"""Reliability, item 7: malformed input. A seeded generator (tests/reliability_inputs.py) makes 240 bad requests in
eight categories, from wrong protobuf wire types to bytes that are not HTTP/2; each goes to a real ApiServer on
loopback (token auth on, batch jobs in an embedded Valkey, the tiny model in-process: every case is refused at the
edge, before any backend runs) through a real gRPC channel, a hand-made HTTP/2 stream or a raw TCP connection. Every
one must get a clear answer (the expected gRPC status, naming what was wrong where the API is the one answering; a
GOAWAY, RST_STREAM or close for transport garbage), the server's invalid-request counter must count exactly the
INVALID_ARGUMENT answers, and a good request must be answered afterwards, equal to the same request answered before
any bad one. About 10 s on 2 cores."""

from __future__ import annotations

from collections import Counter

import grpc
import pytest
import reliability_wire as wire
from pdllm.cluster.api.in_process import InProcessBackend
from pdllm.cluster.api.params import ApiLimits
from pdllm.cluster.api.server import ApiServer, ApiServerConfig
from pdllm.cluster.batch.store import BatchStore
from pdllm.cluster.kv.redis_server import EmbeddedRedis
from reliability_inputs import CATEGORIES, SERVICE, STREAMING, BadInput, bad_inputs

from pdllm.client import Client

TOKEN = "reliability-inputs-token"
SEED, PER_CATEGORY = 8, 30
LIMITS = ApiLimits(max_context_bytes=64 << 10, max_question_bytes=1 << 10)
MAX_MESSAGE = 1 << 20
STATUS_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}
H2_ERRORS = {0: "NO_ERROR", 1: "PROTOCOL_ERROR", 2: "INTERNAL_ERROR", 3: "FLOW_CONTROL_ERROR", 6: "FRAME_SIZE_ERROR"}
GOOD = (
    "The pass key is 71432. Remember it. " * 4,
    "What is the pass key?",
    {"gen_length": 8, "block_length": 8, "steps": 8},
)


@pytest.fixture(scope="module")
def server(tiny_llada, tmp_path_factory):
    valkey = EmbeddedRedis(tmp_path_factory.mktemp("valkey")).start()
    backend = InProcessBackend.from_directory(str(tiny_llada), name="tiny")
    store = BatchStore(valkey.client(decode_responses=True, socket_timeout=10), prefix="inputs:")
    cfg = ApiServerConfig(port=0, auth_token=TOKEN, max_message_bytes=MAX_MESSAGE, limits=LIMITS)
    try:
        with ApiServer(backend, cfg, store) as srv:
            yield srv
    finally:
        backend.close()
        valkey.stop()


def grpc_answer(case: BadInput, channel: grpc.Channel) -> tuple[str, str]:
    """(status name, details) of the case sent as raw request bytes on a real gRPC channel."""
    metadata = list(case.metadata) + ([("authorization", case.auth)] if case.auth is not None else [])
    try:
        if case.method in STREAMING:
            list(channel.unary_stream(SERVICE + case.method)(case.payload, timeout=10, metadata=metadata))
        else:
            channel.unary_unary(SERVICE + case.method)(case.payload, timeout=10, metadata=metadata)
    except grpc.RpcError as err:
        return err.code().name, err.details() or ""
    return "OK", ""


def h2_answer(case: BadInput, address: str) -> tuple[str, str]:
    """What the server ends a hand-made HTTP/2 stream with: its grpc-status, else RST_STREAM / GOAWAY / close."""
    conn = wire.RawH2(address, timeout_s=10)
    try:
        headers = dict(wire.request_headers(address, SERVICE + case.method, None))
        headers.update(case.headers or ())
        if case.auth is not None:
            headers["authorization"] = case.auth
        conn.send(list(headers.items()), case.payload)
        frames = conn.read_answer(1, 10)
        fields = conn.headers(frames, 1)
    finally:
        conn.close()
    if "grpc-status" in fields:
        return STATUS_NAMES.get(int(fields["grpc-status"]), fields["grpc-status"]), fields.get("grpc-message", "")
    return connection_ending(frames)


def tcp_answer(case: BadInput, address: str) -> tuple[str, str]:
    conn = wire.RawH2(address, timeout_s=10, preface=case.preface)
    try:
        try:
            conn.sock.sendall(case.payload)
        except OSError as exc:  # the server closed while the rest was still being sent
            return "CLOSED", f"while sending: {exc}"
        frames = conn.read_answer(0, 10)
    finally:
        conn.close()
    return connection_ending(frames)


def connection_ending(frames: list) -> tuple[str, str]:
    code = wire.goaway_code(frames)
    if code is not None:
        return "GOAWAY", H2_ERRORS.get(code, str(code))
    if wire.rst_code(frames) is not None:
        return "RST_STREAM", H2_ERRORS.get(wire.rst_code(frames), "")
    return ("CLOSED", "") if wire.closed(frames) else ("NO_ANSWER", f"{len(frames)} frames, none ending the call")


def answer(case: BadInput, address: str, channel: grpc.Channel) -> tuple[str, str]:
    if case.via == "grpc":
        return grpc_answer(case, channel)
    return h2_answer(case, address) if case.via == "h2" else tcp_answer(case, address)


@pytest.mark.timeout(120)
def test_every_bad_input_gets_a_clear_answer_and_the_server_keeps_serving(server):
    cases = bad_inputs(SEED, PER_CATEGORY, TOKEN, LIMITS, MAX_MESSAGE)
    assert len(cases) >= 200 and {c.category for c in cases} == set(CATEGORIES)
    with Client(server.address, auth_token=TOKEN, timeout_s=30, retries=0) as client:
        reference = client.generate(*GOOD)["answer"]
        before = client.health()["requests"]
        seen: Counter = Counter()
        wrong = []
        with grpc.insecure_channel(server.address) as channel:
            for case in cases:
                outcome, details = answer(case, server.address, channel)
                seen[(case.category, outcome)] += 1
                if outcome not in case.expect or case.needle not in details:
                    wrong.append((case.category, case.name, outcome, details[:200]))
        print("\nbad inputs by category and answer:")
        for (category, outcome), n in sorted(seen.items()):
            print(f"  {category:<13} {outcome:<19} {n}")
        assert not wrong, f"{len(wrong)} of {len(cases)} bad inputs answered wrongly: {wrong[:10]}"
        after = client.health()
        invalid = sum(n for (_, outcome), n in seen.items() if outcome == "INVALID_ARGUMENT")
        assert after["requests"]["invalid"] - before["invalid"] == invalid  # every refusal came from the API itself
        assert after["requests"]["completed"] == before["completed"]  # no bad input was answered as if it were good
        assert after["streams"]["open"] == 0 and after["admission"]["running"] == 0
        assert client.generate(*GOOD)["answer"] == reference  # still serving, and serving the same
