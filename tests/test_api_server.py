"""The pdllm.v1 gRPC server on loopback with a real tiny model: answers, streaming, validation codes, limits,
deadlines, reflection and standard health; after every rejected call the server still answers."""

from __future__ import annotations

import threading

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from pdllm.cluster.api.in_process import InProcessBackend
from pdllm.cluster.api.params import ApiLimits
from pdllm.cluster.api.server import ApiServer, ApiServerConfig
from pdllm.proto import pdllm_api_pb2 as pb

from pdllm.client import ApiError, Client
from pdllm.engine import MODES

SMALL = {"gen_length": 8, "block_length": 8, "steps": 8}
CONTEXT = "The pass key is 71432. Remember it. " * 4
LIMITS = ApiLimits(max_context_bytes=64 << 10, max_question_bytes=1024, max_gen_length=256)


@pytest.fixture(scope="module")
def backend(tiny_llada):
    b = InProcessBackend.from_directory(str(tiny_llada), name="tiny")
    yield b
    b.close()


@pytest.fixture(scope="module")
def server(backend):
    cfg = ApiServerConfig(port=0, max_running=1, max_waiting=1, max_message_bytes=1 << 20, limits=LIMITS)
    with ApiServer(backend, cfg) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with Client(server.address, timeout_s=30, retries=0) as c:
        yield c


def still_serving(client: Client) -> None:
    out = client.generate(CONTEXT, "What is the pass key?", **SMALL)
    assert out["stats"]["steps"] == 8


def test_generate_returns_answer_and_stats(client, backend):
    from pdllm.engine import generate
    from pdllm.sampler import SamplerConfig

    out = client.generate(CONTEXT, "What is the pass key?", **SMALL)
    stats = out["stats"]
    want = generate(backend.lm, CONTEXT, "What is the pass key?", SamplerConfig(**SMALL), "vanilla")
    assert out["answer"] == want.answer and out["request_id"]  # the engine's answer, carried intact
    for key in ("prefill_chunks", "reused_chunks", "selected_chunks", "steps", "queue_seconds"):
        assert key in stats
    assert stats["steps"] == 8 and stats["generated_tokens"] <= 8 and stats["mode"] == "vanilla"
    assert stats["context_tokens"] == len(CONTEXT.encode())  # byte tokenizer: one token per byte


@pytest.mark.parametrize("mode", MODES)
def test_every_engine_mode_is_served_with_chunk_stats(client, mode):
    params = {**SMALL, "mode": mode, "chunk_size": 32, "chunking": "fixed", "top_k": 2}
    stats = client.generate(CONTEXT * 4, "What is the pass key?", params)["stats"]
    assert stats["mode"] == mode and stats["steps"] == 8
    if mode == "sparse":  # 576 context tokens in fixed chunks of 32: every chunk encoded once, two selected
        assert stats["prefill_chunks"] + stats["reused_chunks"] == 18 and stats["selected_chunks"] == 2


def test_stream_reports_prefill_each_step_and_final(client):
    events = list(client.generate_stream(CONTEXT, "What is the pass key?", request_id="req-1", **SMALL))
    kinds = [e["type"] for e in events]
    assert kinds[0] == "prefill" and kinds[-1] == "final"
    steps = [e for e in events if e["type"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, 9))
    assert all(e["total_steps"] == 8 for e in steps)
    assert [e["unmasked_tokens"] for e in steps] == list(range(1, 9))  # LLaDA rule: one token per step here
    final = events[-1]
    assert final["request_id"] == "req-1" and final["answer"] == steps[-1]["partial_text"]


def test_stream_matches_unary_answer(client):
    unary = client.generate(CONTEXT, "Where?", **SMALL)
    streamed = list(client.generate_stream(CONTEXT, "Where?", **SMALL))[-1]
    assert streamed["answer"] == unary["answer"]


@pytest.mark.parametrize(
    ("context", "question", "params", "needle"),
    [
        ("", "q?", SMALL, "context is empty"),
        (CONTEXT, "   ", SMALL, "question is empty"),
        ("x" * (LIMITS.max_context_bytes + 1), "q?", SMALL, "context is"),
        (CONTEXT, "q" * 2000, SMALL, "question is"),
        (b"caf\xc3 \xff\xfe", "q?", SMALL, "context is not valid UTF-8"),
        (CONTEXT, b"\xed\xa0\x80?", SMALL, "question is not valid UTF-8"),  # an encoded surrogate
        (CONTEXT, "q?", {"gen_length": 0}, "gen_length"),
        (CONTEXT, "q?", {"gen_length": 4096}, "gen_length"),
        (CONTEXT, "q?", {"gen_length": 8, "block_length": 3, "steps": 8}, "multiple of block_length"),
        (CONTEXT, "q?", {**SMALL, "steps": 0}, "steps"),
        (CONTEXT, "q?", {"gen_length": 16, "block_length": 8, "steps": 5}, "steps"),
        (CONTEXT, "q?", {**SMALL, "top_k": 0}, "top_k"),
        (CONTEXT, "q?", {**SMALL, "temperature": -0.5}, "temperature"),
        (CONTEXT, "q?", {**SMALL, "temperature": float("nan")}, "temperature"),
        (CONTEXT, "q?", {**SMALL, "threshold": 1.5}, "threshold"),
        (CONTEXT, "q?", {**SMALL, "keep_ratio": 0.0}, "keep_ratio"),
        (CONTEXT, "q?", {**SMALL, "mode": "warp"}, "unknown mode"),
        (CONTEXT, "q?", {**SMALL, "remasking": "sometimes"}, "remasking"),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 30 else "",
)
def test_invalid_requests_get_invalid_argument(client, context, question, params, needle):
    for call in (client.generate, lambda *a, **k: list(client.generate_stream(*a, **k))):
        with pytest.raises(ApiError) as err:
            call(context, question, params)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert needle in err.value.details
    still_serving(client)


def test_unknown_model_is_invalid_argument(client, backend):
    with pytest.raises(ApiError) as err:
        client.generate(CONTEXT, "q?", SMALL, model="llada-8b-nope")
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "unknown model" in err.value.details
    assert client.generate(CONTEXT, "q?", SMALL, model="tiny")["answer"] is not None
    assert client.generate(CONTEXT, "q?", SMALL, model=backend.lm.model_id)["answer"] is not None


def test_message_over_the_size_limit_is_resource_exhausted(client):
    with pytest.raises(ApiError) as err:
        client.generate("y" * (2 << 20), "q?", SMALL)
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    still_serving(client)


class GatedBackend:
    """The real backend, held at its first denoising step until `release` is set: a call occupies its running slot
    for as long as a test needs, so queueing and refusal follow from events, not from how fast the model is."""

    def __init__(self, backend) -> None:
        self.backend = backend
        self.entered, self.release = threading.Event(), threading.Event()
        self.steps_after_release = 0

    def generate(self, context, question, params, request_id, on_event=None, timeout_s=None):
        def gate(event: dict) -> None:
            if event["type"] == "step":
                if not self.entered.is_set():
                    self.entered.set()
                    assert self.release.wait(60), "the test never released the gate"
                else:
                    self.steps_after_release += 1
            if on_event is not None:
                on_event(event)

        return self.backend.generate(context, question, params, request_id, gate, timeout_s)

    def model_info(self) -> dict:
        return self.backend.model_info()

    def health(self) -> dict:
        return self.backend.health()


@pytest.fixture
def gated(backend):
    gate = GatedBackend(backend)
    cfg = ApiServerConfig(port=0, max_running=1, max_waiting=1, limits=LIMITS)
    with ApiServer(gate, cfg) as srv, Client(srv.address, timeout_s=60, retries=0) as c:
        yield gate, c
        gate.release.set()


def test_full_queue_is_resource_exhausted(gated):
    """One runs (held at its first step), one waits (its stream says queued), the next is refused at once; both
    admitted calls then finish."""
    gate, client = gated
    results: dict[str, object] = {}

    def run(name: str) -> None:
        try:
            results[name] = client.generate(CONTEXT, "q?", SMALL)["answer"]
        except ApiError as exc:
            results[name] = exc.code

    first = threading.Thread(target=run, args=("first",))
    first.start()
    assert gate.entered.wait(30)  # the first call holds the only running slot
    stream = client.generate_stream(CONTEXT, "q?", **SMALL)
    assert next(stream) == {"type": "queued", "position": 0}  # the second waits in the only queue place
    with pytest.raises(ApiError) as refused:
        client.generate(CONTEXT, "q?", SMALL)
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "server busy" in refused.value.details
    gate.release.set()
    rest = list(stream)
    first.join(60)
    assert rest[-1]["type"] == "final" and isinstance(results["first"], str)  # an answer, not a status code
    assert client.health()["admission"] == {"running": 0, "waiting": 0, "refused": 1}


def test_deadline_exceeded_stops_the_work(gated, backend):
    """The deadline passes while the call is held mid-denoising; once let go, the request stops at its next step
    instead of running the rest of its 64 steps."""
    gate, client = gated
    slow = {"gen_length": 64, "block_length": 64, "steps": 64}
    before = client.health()["requests"]
    with pytest.raises(ApiError) as err:
        client.generate(CONTEXT * 16, "q?", slow, timeout_s=0.4)
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert gate.entered.is_set()  # it was running, not refused or queued
    gate.release.set()
    # the in-process backend runs one request at a time: the next answer comes after the stopped one has ended
    still_serving(client)
    assert gate.steps_after_release == 8  # only the next call's 8 steps: none of the stopped call's 63 left
    assert backend.health()["running"] == 0
    after = client.health()["requests"]
    stopped = lambda c: c["deadline_exceeded"] + c["cancelled"]  # noqa: E731
    assert stopped(after) == stopped(before) + 1


def test_an_error_from_inside_the_engine_is_internal_with_its_cause_logged(
    server, client, backend, monkeypatch, caplog
):
    """Only validation errors are INVALID_ARGUMENT: a ValueError from deep inside (a kernel's shape check) is the
    server's fault, INTERNAL for the client, the cause in the log."""
    import pdllm.cluster.api.in_process as in_process

    def broken(*args, **kwargs):
        raise ValueError("sparse_attention: q has 7 heads, k has 2 (shape check)")

    monkeypatch.setattr(in_process, "generate", broken)
    with caplog.at_level("ERROR", logger="pdllm.cluster.api.errors"), pytest.raises(ApiError) as err:
        client.generate(CONTEXT, "What is the pass key?", **SMALL)
    assert err.value.code == grpc.StatusCode.INTERNAL and err.value.details == "internal error: ValueError"
    assert "q has 7 heads" in caplog.text  # the cause, for the operator
    monkeypatch.undo()
    with pytest.raises(ApiError) as bad:  # a parameter out of range is still the caller's: INVALID_ARGUMENT
        client.generate(CONTEXT, "What is the pass key?", {**SMALL, "steps": 0})
    assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT and "steps" in bad.value.details
    still_serving(client)


def test_health_and_model_info(client, server):
    health = client.health()
    assert health["serving"] and health["backend"]["model"] == "tiny"
    info = client.model_info()
    assert info["name"] == "tiny" and info["family"] == "llada" and info["modes"] == list(MODES)
    with grpc.insecure_channel(server.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="pdllm.v1.Pdllm"), timeout=5
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lets_a_generic_client_call_the_api(server):
    """Only the server's reflection service describes the messages: no generated code on this side."""
    with grpc.insecure_channel(server.address) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        assert "pdllm.v1.Pdllm" in db.get_services()
        pool = descriptor_pool.DescriptorPool(db)
        method = pool.FindServiceByName("pdllm.v1.Pdllm").FindMethodByName("Generate")
        request_cls = message_factory.GetMessageClass(method.input_type)
        reply_cls = message_factory.GetMessageClass(method.output_type)
        assert request_cls is not pb.GenerateRequest
        request = request_cls(context=CONTEXT.encode(), question=b"q?")
        request.params.gen_length, request.params.block_length, request.params.steps = 8, 8, 8
        call = channel.unary_unary(
            "/pdllm.v1.Pdllm/Generate",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=reply_cls.FromString,
        )
        reply = call(request, timeout=30)
    assert reply.stats.steps == 8 and reply.request_id


def test_batch_calls_without_a_store_say_so(client):
    with pytest.raises(ApiError) as err:
        client.get_batch("b1")
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "not enabled" in err.value.details


def test_instruction_scoring_and_presets_are_request_parameters(client):
    base = {**SMALL, "mode": "sparse", "chunk_size": 32, "top_k": 1}
    instruction = "Answer with the pass key only.\n"
    out = client.generate(
        CONTEXT * 4, "What is the pass key?", {**base, "instruction": instruction, "scoring": "draft"}
    )
    stats = out["stats"]
    assert stats["instruction_tokens"] == len(instruction) and stats["scoring"] == "draft"
    assert stats["selected_kv"] == "reuse" and len(stats["draft_tokens"]) == 2
    # a preset fills what the request leaves unset; what it sets wins
    paper = client.generate(CONTEXT * 4, "What is the pass key?", {"preset": "paper", "chunk_size": 64})["stats"]
    assert paper["scoring"] == "draft" and paper["selected_kv"] == "joint" and paper["chunk_size"] == 64
    assert paper["top_k"] == 4 and paper["mode"] == "sparse"
    for bad, needle in (({"preset": "slow"}, "unknown preset"), ({"scoring": "bm25"}, "scoring must be")):
        with pytest.raises(ApiError) as err:
            client.generate(CONTEXT, "What is the pass key?", {**SMALL, **bad})
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and needle in err.value.details
    still_serving(client)


def test_chunking_is_a_request_parameter_that_reaches_the_engine(client):
    """Text chunks end at sentence borders (more, shorter chunks than fixed ones here); a bad value is refused."""
    params = {**SMALL, "mode": "sparse", "chunk_size": 32, "top_k": 2}
    text = client.generate(CONTEXT * 4, "What is the pass key?", params)["stats"]  # the default
    fixed = client.generate(CONTEXT * 4, "What is the pass key?", {**params, "chunking": "fixed"})["stats"]
    assert (text["chunking"], fixed["chunking"]) == ("text", "fixed")
    assert fixed["chunks"] == -(-fixed["context_tokens"] // 32) < text["chunks"]
    with pytest.raises(ApiError) as err:
        client.generate(CONTEXT, "What is the pass key?", {**params, "chunking": "sentences"})
    assert (
        err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        and "chunking must be one of text, fixed" in err.value.details
    )
    still_serving(client)


def test_keep_question_kv_is_a_request_parameter_that_reaches_the_engine(client):
    params = {**SMALL, "mode": "sparse", "chunk_size": 32, "top_k": 2}
    kept = client.generate(CONTEXT, "What is the pass key?", {**params, "keep_question_kv": True})
    plain = client.generate(CONTEXT, "What is the pass key?", params)
    assert kept["stats"]["keep_question_kv"] is True and plain["stats"]["keep_question_kv"] is False
    assert kept["stats"]["steps"] == plain["stats"]["steps"] == 8
    from pdllm.cluster.api.params import complete_params

    from pdllm.errors import InvalidRequest

    with pytest.raises(InvalidRequest, match="keep_question_kv must be true or false"):  # JSON batch lines, HTTP
        complete_params({**params, "keep_question_kv": "yes"}, MODES)
