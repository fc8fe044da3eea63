"""Structured logs: JSON lines that parse and carry the request id, across threads and re-entry."""

from __future__ import annotations

import contextvars
import io
import json
import logging
import threading

import pytest

from pdllm.observability.logs import configure_logging, current_request_id, request_context


@pytest.fixture
def stream():
    buf = io.StringIO()
    handler = configure_logging(json=True, level="DEBUG", stream=buf)
    yield buf
    logging.getLogger().removeHandler(handler)


def lines(buf: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in buf.getvalue().splitlines()]


def test_json_lines_carry_request_id_and_extra(stream):
    log = logging.getLogger("pdllm.test")
    log.info("outside")
    with request_context("req-42") as rid:
        assert rid == "req-42" and current_request_id() == "req-42"
        log.info("chunk %d fetched", 3, extra={"transport": "grpc", "nbytes": 1024})
    assert current_request_id() is None
    out = lines(stream)
    assert [d["msg"] for d in out] == ["outside", "chunk 3 fetched"]
    assert out[0]["request_id"] is None
    assert out[1]["request_id"] == "req-42"
    assert out[1]["transport"] == "grpc" and out[1]["nbytes"] == 1024
    assert out[1]["level"] == "INFO" and out[1]["logger"] == "pdllm.test"
    assert out[1]["ts"].endswith("+00:00")


def test_nested_contexts_restore_and_new_ids(stream):
    with request_context("outer"):
        with request_context(None) as inner:
            assert inner and inner != "outer"
            assert current_request_id() == inner
        assert current_request_id() == "outer"


def test_id_follows_copied_context_into_threads_and_actor_style_reentry(stream):
    log = logging.getLogger("pdllm.test")

    def actor_method(request_id: str) -> None:  # what a Ray actor does with the id it receives
        with request_context(request_id):
            log.warning("in actor")

    with request_context("req-7"):
        ctx = contextvars.copy_context()
        t = threading.Thread(target=ctx.run, args=(log.info, "in thread"))
        t.start()
        t.join(5)
        rid = current_request_id()
    t2 = threading.Thread(target=actor_method, args=(rid,))  # a bare thread: only the argument carries the id
    t2.start()
    t2.join(5)
    out = lines(stream)
    assert {d["msg"]: d["request_id"] for d in out} == {"in thread": "req-7", "in actor": "req-7"}


def test_exceptions_and_unserializable_extras(stream):
    log = logging.getLogger("pdllm.test")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed", extra={"obj": object()})
    (d,) = lines(stream)
    assert "ValueError: boom" in d["exc"] and d["level"] == "ERROR" and d["obj"].startswith("<object")


def test_text_mode_and_reconfigure_do_not_duplicate():
    buf = io.StringIO()
    configure_logging(json=True, stream=buf)
    handler = configure_logging(json=False, level=logging.INFO, stream=buf)
    try:
        with request_context("abc"):
            logging.getLogger("pdllm.x").info("hello")
        assert buf.getvalue().count("hello") == 1
        assert "[abc] hello" in buf.getvalue()
    finally:
        logging.getLogger().removeHandler(handler)
