"""The OpenAI-compatible HTTP API on loopback, driven by the official `openai` client: models, chat and completions
unary and streamed (the streamed text equals the unary text), usage and finish_reason, the mapping of messages and
prompts onto context and question (the same answer as the gRPC API), chunks of a long document prefilled once
across chat requests, and the error codes (400, 401, 404, 429, 503, 500) in OpenAI's error JSON."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import openai
import pytest
from pdllm.cluster.api.http_api import HttpApiConfig, HttpApiServer, http_error
from pdllm.cluster.api.in_process import InProcessBackend
from pdllm.cluster.api.openai_schema import parse_chat, parse_completion
from pdllm.cluster.api.openai_stream import StableText
from pdllm.cluster.api.params import ApiLimits
from pdllm.cluster.api.server import ApiServer, ApiServerConfig

from pdllm.client import Client

TOKEN = "http-test-token"
CONTEXT = "The pass key is 71432. Remember it. " * 4
QUESTION = "What is the pass key?"
SMALL = {"block_length": 4}  # with max_tokens=16: 4 blocks of 4, 16 steps
LIMITS = ApiLimits(max_context_bytes=64 << 10, max_question_bytes=1024, max_gen_length=1024)


@pytest.fixture(scope="module")
def backend(tiny_llada):
    b = InProcessBackend.from_directory(str(tiny_llada), name="tiny")
    yield b
    b.close()


@pytest.fixture(scope="module")
def grpc_server(backend):
    cfg = ApiServerConfig(port=0, auth_token=TOKEN, max_running=1, max_waiting=0, limits=LIMITS)
    with ApiServer(backend, cfg) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(grpc_server):
    with HttpApiServer(HttpApiConfig(port=0, auth_token=TOKEN), grpc_server.servicer) as srv:
        yield srv


@pytest.fixture(scope="module")
def oai(http):
    with openai.OpenAI(base_url=http.url + "/v1", api_key=TOKEN, max_retries=0, timeout=60) as c:
        yield c


def chat_messages(question: str = QUESTION, context: str = CONTEXT) -> list[dict]:
    return [{"role": "user", "content": context}, {"role": "user", "content": question}]


def test_models_lists_the_served_model(oai, backend):
    models = oai.models.list().data
    assert [m.id for m in models] == ["tiny"] and models[0].owned_by == "pdllm"
    assert models[0].model_extra["max_model_len"] == backend.lm.spec.max_position
    assert oai.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("llada-8b-nope")


def test_chat_answers_as_the_grpc_api_does(oai, grpc_server):
    out = oai.chat.completions.create(model="tiny", messages=chat_messages(), max_tokens=16, extra_body=SMALL)
    choice = out.choices[0]
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-") and choice.message.role == "assistant"
    with Client(grpc_server.address, auth_token=TOKEN, timeout_s=60, retries=0) as c:
        ref = c.generate(CONTEXT, QUESTION, gen_length=16, block_length=4, steps=16)
    assert choice.message.content == ref["answer"]
    stats = out.model_extra["pdllm"]
    assert (
        out.usage.prompt_tokens
        == stats["context_tokens"] + stats["question_tokens"]
        == (ref["stats"]["context_tokens"] + ref["stats"]["question_tokens"])
    )
    assert out.usage.completion_tokens == stats["generated_tokens"] <= 16
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    assert choice.finish_reason == ("length" if stats["generated_tokens"] == 16 else "stop")


def test_chat_stream_equals_unary_and_comes_in_blocks(oai):
    kwargs = {"model": "tiny", "messages": chat_messages(), "max_tokens": 16, "extra_body": SMALL}
    unary = oai.chat.completions.create(**kwargs)
    chunks = list(oai.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(deltas) == unary.choices[0].message.content
    assert len(deltas) >= 2  # sent as blocks finished, not all at the end
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [unary.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == unary.usage


def test_completion_splits_prompt_at_its_last_line_or_at_question(oai, backend):
    params = {"gen_length": 16, "block_length": 4, "steps": 16}
    ref = backend.generate(CONTEXT.rstrip(), QUESTION, params, "ref")["answer"]
    by_line = oai.completions.create(model="tiny", prompt=CONTEXT + "\n" + QUESTION, max_tokens=16, extra_body=SMALL)
    explicit = oai.completions.create(
        model="tiny", prompt=CONTEXT.rstrip(), max_tokens=16, extra_body={**SMALL, "question": QUESTION}
    )
    assert by_line.object == "text_completion" and by_line.id.startswith("cmpl-")
    assert by_line.choices[0].text == explicit.choices[0].text == ref
    streamed = oai.completions.create(
        model="tiny", prompt=CONTEXT + "\n" + QUESTION, max_tokens=16, extra_body=SMALL, stream=True
    )
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == ref
    assert chunks[-1].choices[0].finish_reason == by_line.choices[0].finish_reason


def test_system_message_is_the_instruction_kept_before_the_context(oai, backend):
    messages = [{"role": "system", "content": "Answer briefly."}, *chat_messages()]
    out = oai.chat.completions.create(model="tiny", messages=messages, max_tokens=8, extra_body={"block_length": 8})
    params = {"gen_length": 8, "block_length": 8, "steps": 8, "instruction": "Answer briefly."}
    ref = backend.generate(CONTEXT, QUESTION, params, "r")
    assert out.choices[0].message.content == ref["answer"]
    stats = out.model_extra["pdllm"]
    assert stats["context_tokens"] == ref["stats"]["context_tokens"] == len(CONTEXT.encode())
    assert stats["instruction_tokens"] == len(b"Answer briefly.")


def test_dllm_knobs_are_extra_fields(oai):
    knobs = {"block_length": 8, "steps": 8, "threshold": 0.9, "mode": "sparse", "chunk_size": 32, "top_k": 2}
    out = oai.chat.completions.create(model="tiny", messages=chat_messages(context=CONTEXT * 4), max_tokens=8,
                                      extra_body={**knobs, "keep_ratio": 0.5, "chunking": "fixed"})  # fmt: skip
    stats = out.model_extra["pdllm"]
    assert stats["mode"] == "sparse" and stats["chunk_size"] == 32 and stats["top_k"] == 2
    assert stats["chunking"] == "fixed"
    assert stats["keep_ratio"] == 0.5 and stats["selected_chunks"] == 2 and stats["steps"] <= 8


def test_long_document_asked_twice_through_chat_prefills_its_chunks_once(oai):
    document = " ".join(f"Record {i}: the code of item {i} is {(i * 7919) % 10000}." for i in range(40))
    knobs = {"mode": "sparse", "chunk_size": 64, "top_k": 2, "block_length": 8}
    first = oai.chat.completions.create(
        model="tiny", messages=chat_messages("What is the code of item 3?", document), max_tokens=8, extra_body=knobs
    ).model_extra["pdllm"]
    second = oai.chat.completions.create(
        model="tiny", messages=chat_messages("What is the code of item 31?", document), max_tokens=8, extra_body=knobs
    ).model_extra["pdllm"]
    assert first["chunks"] == second["chunks"] > 10
    assert first["prefill_chunks"] == first["chunks"] and first["reused_chunks"] == 0
    assert second["prefill_chunks"] == 0 and second["reused_chunks"] == second["chunks"]


def test_stop_sequence_cuts_unary_and_stream_alike(oai):
    kwargs = {"model": "tiny", "messages": chat_messages(), "max_tokens": 16, "extra_body": SMALL}
    full = oai.chat.completions.create(**kwargs).choices[0].message.content
    assert len(full) > 2
    stop = full[len(full) // 2 :][:2]
    cut = oai.chat.completions.create(**kwargs, stop=[stop])
    assert cut.choices[0].message.content == full[: full.find(stop)] and cut.choices[0].finish_reason == "stop"
    chunks = list(oai.chat.completions.create(**kwargs, stop=[stop], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == cut.choices[0].message.content


@pytest.mark.parametrize(
    ("body", "needle", "param"),
    [
        ({"max_tokens": 5000}, "max_tokens must be an integer in [1, 1024]", "max_tokens"),
        ({"max_tokens": 16, "block_length": 3}, "max_tokens 16 is not a multiple of block_length 3", "max_tokens"),
        ({"extra_body": {"steps": 0}}, "steps", "steps"),
        ({"temperature": 9.0}, "temperature", "temperature"),
        ({"extra_body": {"top_k": 0}}, "top_k", "top_k"),
        ({"extra_body": {"keep_ratio": 0}}, "keep_ratio", "keep_ratio"),
        ({"extra_body": {"mode": "warp"}}, "unknown mode", None),
        ({"n": 2}, "n=2 is not supported", "n"),
        ({"extra_body": {"gen_length": 8}}, "unknown parameter(s): gen_length", None),
        ({"extra_body": {"warp_factor": 9}}, "unknown parameter(s): warp_factor", None),
        ({"messages": []}, "messages must be a non-empty list", "messages"),
        ({"messages": [{"role": "user", "content": "only one line?"}]}, "single line", None),
        ({"messages": [{"role": "tool", "content": "x"}]}, "role 'tool' is not supported", None),
        ({"messages": [*chat_messages(), {"role": "assistant", "content": "a"}]}, "must be from the user", "messages"),
        ({"messages": chat_messages(question="   ")}, "question is empty", "question"),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 30 else "",
)
def test_bad_parameters_are_400_naming_the_parameter(oai, body, needle, param):
    body = dict(body)
    if "block_length" in body:
        body.setdefault("extra_body", {})["block_length"] = body.pop("block_length")
    kwargs = {"model": "tiny", "messages": chat_messages(), **body}
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(**kwargs)
    assert err.value.status_code == 400 and needle in err.value.body["message"], err.value.body
    assert err.value.body["type"] == "invalid_request_error" and err.value.body["param"] == param
    assert oai.chat.completions.create(model="tiny", messages=chat_messages(), max_tokens=4).choices


def test_token_unknown_model_and_unknown_path(http, oai):
    with openai.OpenAI(base_url=http.url + "/v1", api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError) as err:
            bad.chat.completions.create(model="tiny", messages=chat_messages(), max_tokens=4)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.NotFoundError) as err:
        oai.chat.completions.create(model="llada-8b-nope", messages=chat_messages(), max_tokens=4)
    assert err.value.body["code"] == "model_not_found" and "unknown model" in err.value.body["message"]
    with pytest.raises(urllib.error.HTTPError) as raw:
        urllib.request.urlopen(urllib.request.Request(http.url + "/v1/embeddings", method="POST"), timeout=10)
    assert raw.value.code == 404 and json.loads(raw.value.read())["error"]["type"] == "invalid_request_error"


def test_curl_style_request_with_broken_json_is_400(http):
    req = urllib.request.Request(
        http.url + "/v1/completions",
        data=b'{"model": "tiny", "prompt": ',
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 400 and "not JSON" in json.loads(err.value.read())["error"]["message"]


def test_busy_server_is_429_and_a_vanished_stream_stops_its_work(oai, backend, grpc_server):
    """max_running=1, max_waiting=0: while a long stream runs, another request is refused; closing the stream's
    connection stops the stream's request at the backend."""
    before = dict(grpc_server.servicer.counters)
    holder = oai.chat.completions.create(model="tiny", messages=chat_messages(context=CONTEXT * 8), max_tokens=1024,
                                         extra_body={"block_length": 1024}, stream=True)  # fmt: skip
    first = next(iter(holder))  # the request is admitted and generating
    assert first.choices[0].delta.role == "assistant"
    with pytest.raises(openai.RateLimitError) as err:
        oai.chat.completions.create(model="tiny", messages=chat_messages(), max_tokens=4)
    assert err.value.status_code == 429 and err.value.body["code"] == "rate_limit_exceeded"
    holder.close()
    snapshot = grpc_server.servicer.admission.snapshot
    waited = _wait_until(lambda: snapshot()["running"] == 0 and backend.health()["running"] == 0, 30)
    assert waited, "the abandoned stream kept generating"
    after = grpc_server.servicer.counters
    assert after["cancelled"] == before["cancelled"] + 1 and after["failed"] == before["failed"] + 1
    assert oai.chat.completions.create(model="tiny", messages=chat_messages(), max_tokens=4).choices


def _wait_until(check, timeout_s: float) -> bool:
    import threading
    import time

    deadline, pause = time.monotonic() + timeout_s, threading.Event()
    while not check():
        if time.monotonic() > deadline:
            return False
        pause.wait(0.05)
    return True


def test_not_ready_until_a_servicer_is_attached(grpc_server):
    with HttpApiServer(HttpApiConfig(port=0, auth_token=TOKEN)) as srv:
        with openai.OpenAI(base_url=srv.url + "/v1", api_key=TOKEN, max_retries=0) as c:
            with pytest.raises(openai.InternalServerError) as err:
                c.chat.completions.create(model="tiny", messages=chat_messages(), max_tokens=4)
            assert err.value.status_code == 503 and err.value.body["code"] == "not_ready"
            with pytest.raises(urllib.error.HTTPError) as raw:
                urllib.request.urlopen(srv.url + "/health", timeout=10)
            assert raw.value.code == 503
            srv.attach(grpc_server.servicer)
            assert urllib.request.urlopen(srv.url + "/health", timeout=10).status == 200
            assert c.chat.completions.create(model="tiny", messages=chat_messages(), max_tokens=4).choices


def test_unexpected_errors_are_500_without_internals():
    err = http_error(KeyError("secret internals"))
    assert err.status == 500 and err.kind == "server_error" and "secret" not in str(err)


def test_parsing_maps_conversations_and_prompts():
    turns = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Doc A."}]},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "Q?"},
    ]
    req = parse_chat({"model": "m", "messages": turns, "max_tokens": 24}, {})
    assert (req.context, req.question, req.params["instruction"]) == ("Doc A.\n\nAnswer: ok", "Q?", "Be brief.")
    assert req.params == {"gen_length": 24, "block_length": 24, "steps": 24, "instruction": "Be brief."}  # 24 <= 32
    req = parse_completion({"model": "m", "prompt": "line 1\nline 2\n\nthe question?\n", "max_tokens": 100}, {})
    assert (req.context, req.question) == ("line 1\nline 2", "the question?")
    assert req.params == {"gen_length": 100, "block_length": 25, "steps": 100}


def test_stable_text_sends_only_finished_blocks():
    text = StableText(block_length=4, stops=("XY",))
    assert text.step({"unmasked_tokens": 3, "partial_text": "abc"}) == ""  # block 1 unfinished: may still change
    assert text.step({"unmasked_tokens": 4, "partial_text": "abcd"}) == "abcd"
    assert text.step({"unmasked_tokens": 8, "partial_text": "abcdefgX"}) == "efg"  # "X" may begin the stop
    assert text.finish("abcdefgXYz") == "" and text.stopped and text.sent == "abcdefg"


def test_load_client_over_http_answers_as_grpc(backend):
    """The load test's client (pdllm.load_client) over the HTTP API: 4 concurrent openai clients, 8 requests, no
    error, every answer the in-process answer of the same request (and the gRPC answer)."""
    from pdllm.load_client import LoadRequest, run_round

    params = {"gen_length": 8, "block_length": 8, "steps": 8}
    requests = [
        LoadRequest(f"Doc {d}: the value is {d * 37}.", f"Value {q}?", params) for d in range(4) for q in (1, 2)
    ]
    expected = [backend.generate(r.context, r.question, params, f"ref-{i}")["answer"] for i, r in enumerate(requests)]
    cfg = ApiServerConfig(port=0, auth_token=TOKEN, max_running=1, max_waiting=8, limits=LIMITS)
    with ApiServer(backend, cfg) as grpc_srv, HttpApiServer(HttpApiConfig(port=0, auth_token=TOKEN)) as http_srv:
        http_srv.attach(grpc_srv.servicer)
        result = run_round(http_srv.url, requests, clients=4, auth_token=TOKEN, timeout_s=60, api="http")
        grpc_result = run_round(grpc_srv.address, requests, clients=4, auth_token=TOKEN, timeout_s=60)
        assert grpc_srv.servicer.counters["completed"] == 2 * len(requests)
        streamed = concurrent_streams(http_srv.url, requests)  # more open streams than the event loop has threads
        assert grpc_srv.servicer.counters["completed"] == 3 * len(requests)
    assert result.errors == [] and len(result.latencies_s) == len(requests)
    assert result.answers == expected
    assert grpc_result.answers == expected and grpc_result.errors == []
    assert streamed == expected


def concurrent_streams(url: str, requests: list) -> list[str]:
    """Every request as a streamed completion, all at once from their own threads; the streamed texts."""
    from concurrent.futures import ThreadPoolExecutor

    def one(req) -> str:
        with openai.OpenAI(base_url=url + "/v1", api_key=TOKEN, max_retries=0, timeout=60) as c:
            extra = {**{k: v for k, v in req.params.items() if k != "gen_length"}, "question": req.question}
            stream = c.completions.create(model="tiny", prompt=req.context, max_tokens=8, extra_body=extra, stream=True)
            return "".join(chunk.choices[0].text for chunk in stream)

    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(one, requests))


def test_every_api_bounds_answers_by_the_model_length(short_llada):
    """A model of length 256 behind both APIs: gen_length 512 is refused by gRPC and HTTP alike, naming the parameter
    and the model's length (batch submission: tests/test_batch_api.py); a short answer is served."""
    import grpc

    from pdllm.client import ApiError

    short = InProcessBackend.from_directory(str(short_llada), name="short")
    try:
        with (
            ApiServer(short, ApiServerConfig(port=0, auth_token=TOKEN)) as grpc_srv,
            HttpApiServer(HttpApiConfig(port=0, auth_token=TOKEN), grpc_srv.servicer) as http_srv,
        ):
            with Client(grpc_srv.address, auth_token=TOKEN, timeout_s=30, retries=0) as c:
                with pytest.raises(ApiError) as err:
                    c.generate(CONTEXT, QUESTION, gen_length=512, block_length=32, steps=512)
                assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
                assert "gen_length 512 is more than the model's maximum length of 256" in err.value.details
            with openai.OpenAI(base_url=http_srv.url + "/v1", api_key=TOKEN, max_retries=0) as oai:
                with pytest.raises(openai.BadRequestError) as bad:
                    oai.completions.create(model="short", prompt=CONTEXT + "\n" + QUESTION, max_tokens=512)
                assert bad.value.body["param"] == "max_tokens"
                assert "max_tokens 512 is more than the model's maximum length of 256" in bad.value.body["message"]
                ok = oai.completions.create(model="short", prompt=CONTEXT + "\n" + QUESTION, max_tokens=8)
                assert ok.choices[0].finish_reason in ("stop", "length")
    finally:
        short.close()


WRONG_VALUES = (None, True, -1, 0, 2.5, float("inf"), "", "x", [], [1], {}, {"a": 1}, "\udcff")


@pytest.mark.parametrize("endpoint", ["chat/completions", "completions"])
def test_every_field_with_a_wrong_value_is_a_clear_4xx(http, oai, endpoint):
    """Each field of a valid body set to each value of the wrong kind (seeded order): never a 500, never a hang;
    every error is OpenAI's error JSON with a message; the server still answers afterwards."""
    import random

    valid = {"model": "tiny", "max_tokens": 4, "temperature": 0, "block_length": 4, "top_k": 2}
    valid |= {"messages": chat_messages()} if endpoint == "chat/completions" else {"prompt": CONTEXT + "\n" + QUESTION}
    fields = [*valid, "stop", "seed", "steps", "threshold", "chunk_size", "keep_ratio", "mode", "stream_options", "n"]
    cases = [(f, v) for f in fields for v in WRONG_VALUES]
    random.Random(18).shuffle(cases)
    statuses: dict[int, int] = {}
    for field, value in cases[:60]:
        body = json.dumps({**valid, field: value}, allow_nan=True).encode("utf-8", "surrogatepass")
        req = urllib.request.Request(
            f"{http.url}/v1/{endpoint}", data=body, headers={"Authorization": f"Bearer {TOKEN}"}, method="POST"
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as reply:
                status, payload = reply.status, json.loads(reply.read())
        except urllib.error.HTTPError as exc:
            status, payload = exc.code, json.loads(exc.read())
        statuses[status] = statuses.get(status, 0) + 1
        assert status in (200, 400, 404), (field, value, status, payload)
        if status != 200:
            assert payload["error"]["message"] and payload["error"]["type"] == "invalid_request_error"
    assert statuses.get(400, 0) >= 30, statuses
    assert oai.chat.completions.create(model="tiny", messages=chat_messages(), max_tokens=4).choices


def test_deadline_is_504_before_a_stream_starts_and_an_error_event_inside_it(backend):
    """A server whose requests may run 0.5 s: a long unary request is 504; a long stream, already started, ends in
    an error event that the openai client raises; the work stops; counted as deadline_exceeded."""
    cfg = ApiServerConfig(port=0, auth_token=TOKEN, max_running=1, max_waiting=2, limits=LIMITS, default_timeout_s=0.5)
    long = {"messages": chat_messages(context=CONTEXT * 8), "max_tokens": 1024, "extra_body": {"block_length": 1024}}
    with ApiServer(backend, cfg) as grpc_srv, HttpApiServer(HttpApiConfig(port=0, auth_token=TOKEN)) as http_srv:
        http_srv.attach(grpc_srv.servicer)
        with openai.OpenAI(base_url=http_srv.url + "/v1", api_key=TOKEN, max_retries=0, timeout=60) as c:
            with pytest.raises(openai.InternalServerError) as err:
                c.chat.completions.create(model="tiny", **long)
            assert err.value.status_code == 504 and err.value.body["code"] == "deadline_exceeded"
            stream = c.chat.completions.create(model="tiny", **long, stream=True)
            with pytest.raises(openai.APIError) as err:
                for _ in stream:
                    pass
            assert "deadline" in str(err.value)
            assert not isinstance(err.value, openai.APIStatusError)  # an event of the started stream, not a status
        assert _wait_until(lambda: backend.health()["running"] == 0, 30)
        assert grpc_srv.servicer.counters["deadline_exceeded"] == 2
