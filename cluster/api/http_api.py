"""The OpenAI-compatible HTTP API (`pdllm serve --http-port`): FastAPI on uvicorn, beside the gRPC server.

It serves the same `PdllmServicer` as gRPC: the same backend, checks and limits (`check_request`), admission
control and request metrics (`run_request`), the same token (`Authorization: Bearer <token>`). Until a servicer is
attached (the cluster is still starting) every call but /health answers 503, so clients and load balancers can
tell "not ready" from "down". Generation runs in a thread pool; a client that disconnects stops its request at the
backend's next event. Errors are OpenAI's error JSON: 400 bad parameters, 401 token, 404 unknown model or path,
413 body too large, 429 overloaded, 503 not ready or backend lost, 504 deadline, 500 anything else.

    GET  /v1/models                 the served model
    POST /v1/chat/completions       chat (messages -> instruction, context, question; cluster/api/openai_schema.py)
    POST /v1/completions            completions (prompt -> context + question)
    GET  /health                    200 when ready, else 503
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pdllm.cluster.api import openai_schema as oa
from pdllm.cluster.api.errors import HTTP_ERRORS, status_for
from pdllm.cluster.api.openai_stream import StableText
from pdllm.cluster.api.params import PARAM_KEYS, check_request_id
from pdllm.cluster.api.server import PdllmServicer, UnknownModel
from pdllm.cluster.common.auth import token_matches
from pdllm.cluster.common.event_box import EventBox
from starlette.exceptions import HTTPException

from pdllm.errors import Cancelled, DeadlineExceeded, InvalidRequest, PdllmError

log = logging.getLogger(__name__)


@dataclass
class HttpApiConfig:
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (see HttpApiServer.port)
    auth_token: str | None = None  # None: no authentication (loopback development only)
    max_body_bytes: int = 64 << 20
    stream_events: int = 16  # progress events buffered per stream (old step events give way to new ones)


class HttpError(PdllmError):
    """An answer with an HTTP status other than 200, in OpenAI's error shape."""

    def __init__(self, status: int, message: str, kind: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.code, self.param = status, kind, code, param

    def response(self) -> JSONResponse:
        body = oa.error_body(str(self), self.kind, self.code, self.param)
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(body, status_code=self.status, headers=headers)


def _param_named(message: str) -> str | None:
    word = message.split(" ", 1)[0].split("=", 1)[0].rstrip(":")
    return word if word in (*PARAM_KEYS, *oa.CHAT_FIELDS, *oa.COMPLETION_FIELDS, "context", "question") else None


def http_error(exc: BaseException, length_field: str | None = None) -> HttpError:
    """The HTTP answer to an exception from parsing, checking or generating."""
    if isinstance(exc, HttpError):
        return exc
    if isinstance(exc, UnknownModel):
        return HttpError(404, str(exc), "invalid_request_error", "model_not_found", "model")
    if isinstance(exc, InvalidRequest):
        message = str(exc)
        if length_field and message.startswith("gen_length"):  # the client named the answer length otherwise
            message = length_field + message[len("gen_length") :]
        return HttpError(400, message, "invalid_request_error", "invalid_parameter", _param_named(message))
    code, message = status_for(exc, "an HTTP request")
    status, kind, name = HTTP_ERRORS[code]
    return HttpError(status, message, kind, name)


def outcome_key(exc: BaseException) -> str:
    """The request counter (as gRPC counts them) that a failed call ends in."""
    if isinstance(exc, InvalidRequest):
        return "invalid"
    if isinstance(exc, Cancelled):
        return "cancelled"
    return "deadline_exceeded" if isinstance(exc, DeadlineExceeded) else "failed"


def _sse(obj: dict | str) -> bytes:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n".encode()


@dataclass
class _Call:
    """One checked generation request on its way through the servicer."""

    servicer: PdllmServicer
    kind: str  # "chat" or "completion"
    req: oa.OpenAIRequest
    context: str
    question: str
    params: dict
    rid: str
    created: int = 0
    gone: threading.Event = field(default_factory=threading.Event)  # set: the client left

    @property
    def response_id(self) -> str:
        return ("chatcmpl-" if self.kind == "chat" else "cmpl-") + self.rid

    def run(self, sink=None) -> dict:
        timeout = self.servicer.cfg.default_timeout_s
        alive = lambda: not self.gone.is_set()  # noqa: E731
        return self.servicer.run_request(self.context, self.question, self.params, self.rid, timeout, alive, None, sink)

    def chunk(self, text: str, reason: str | None = None) -> dict:
        """A stream chunk carrying `text` in this API's shape."""
        if self.kind == "chat":
            return oa.chat_chunk(self.response_id, self.req.model, self.created, {"content": text}, reason)
        return oa.completion_chunk(self.response_id, self.req.model, self.created, text, reason)


class HttpApi:
    """The FastAPI app and what its handlers share: the servicer (once attached), the token, the worker pool."""

    def __init__(self, cfg: HttpApiConfig, servicer: PdllmServicer | None = None) -> None:
        self.cfg = cfg
        self.servicer: PdllmServicer | None = None
        self.pool: ThreadPoolExecutor | None = None
        self.app = self._build()
        if servicer is not None:
            self.attach(servicer)

    def attach(self, servicer: PdllmServicer) -> None:
        """Start answering with `servicer` (before this, calls get 503)."""
        workers = servicer.cfg.max_running + servicer.cfg.max_waiting + 4  # admission refuses the rest
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="pdllm-http")
        self.servicer = servicer

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)

    # -- per request -------------------------------------------------------------------------------------------
    def _ready(self, request: Request) -> PdllmServicer:
        if self.cfg.auth_token and not token_matches(request.headers.items(), self.cfg.auth_token):
            raise HttpError(401, "missing or invalid authorization token", "authentication_error", "invalid_api_key")
        if self.servicer is None:
            raise HttpError(
                503, "the server is starting: the model is not ready yet", "service_unavailable", "not_ready"
            )
        return self.servicer

    async def _body(self, request: Request) -> dict:
        raw = await request.body()
        if len(raw) > self.cfg.max_body_bytes:
            raise HttpError(
                413, f"request body is {len(raw)} bytes, more than {self.cfg.max_body_bytes}", "invalid_request_error"
            )
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise HttpError(400, f"request body is not JSON: {exc}", "invalid_request_error", "invalid_json") from None

    async def _generate(self, request: Request, kind: str):
        servicer = self._ready(request)
        body = await self._body(request)
        parse = oa.parse_chat if kind == "chat" else oa.parse_completion
        length_field = None
        try:
            req = parse(body, servicer.defaults)
            length_field = req.length_field
            rid = check_request_id(request.headers.get("x-request-id", ""), servicer.limits) or uuid.uuid4().hex
            checked = servicer.check_request(req.model, req.context, req.question, req.params, rid)
        except Exception as exc:
            servicer.count(outcome_key(exc))
            raise http_error(exc, length_field) from None
        call = _Call(servicer, kind, req, *checked, created=oa.now())
        return await (self._stream(call) if req.stream else self._unary(request, call))

    async def _unary(self, request: Request, call: _Call) -> JSONResponse:
        loop = asyncio.get_running_loop()
        work = loop.run_in_executor(self.pool, call.run)
        watcher = asyncio.ensure_future(_wait_disconnect(request, call.gone))
        try:
            result = await work
        except Exception as exc:
            call.servicer.count(outcome_key(exc))
            raise http_error(exc, call.req.length_field) from None
        finally:
            watcher.cancel()
        call.servicer.count("completed")
        text, stopped = oa.cut_at_stop(result["answer"], call.req.stop)
        reason = oa.finish_reason(result["stats"], call.params["gen_length"], stopped)
        build = oa.chat_response if call.kind == "chat" else oa.completion_response
        reply = build(call.response_id, call.req.model, call.created, text, reason, result["stats"])
        return JSONResponse(reply, headers={"X-Request-Id": call.rid})

    async def _stream(self, call: _Call):
        """The request runs in the pool and hands its events to a bounded box (old step events give way to new
        ones, as in the gRPC stream); the event loop is woken for each, so no thread waits per stream."""
        loop, box, ready = asyncio.get_running_loop(), EventBox(self.cfg.stream_events), asyncio.Event()

        def wake() -> None:
            loop.call_soon_threadsafe(ready.set)

        def work() -> None:
            try:
                box.put_final(call.run(lambda event: (box.put_step(event), wake())))
            except BaseException as exc:
                box.put_final(exc)
            wake()

        async def next_item() -> object:
            while True:
                ready.clear()
                if len(box):
                    return box.get(0)
                await ready.wait()

        loop.run_in_executor(self.pool, work)
        first = await next_item()
        if isinstance(first, BaseException):  # refused or failed before anything was generated: a status code
            call.servicer.count(outcome_key(first))
            raise http_error(first, call.req.length_field)
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "X-Request-Id": call.rid}
        return StreamingResponse(self._events(call, first, next_item), media_type="text/event-stream", headers=headers)

    @staticmethod
    async def _events(call: _Call, item: object, next_item) -> AsyncIterator[bytes]:
        chat, stable = call.kind == "chat", StableText(call.params["block_length"], call.req.stop)
        chunk = call.chunk
        ended = False
        try:
            if chat:
                yield _sse(
                    oa.chat_chunk(call.response_id, call.req.model, call.created, {"role": "assistant", "content": ""})
                )
            while True:
                if isinstance(item, BaseException):
                    ended = True
                    call.servicer.count(outcome_key(item))
                    err = http_error(item, call.req.length_field)
                    yield _sse(oa.error_body(str(err), err.kind, err.code, err.param))
                    break
                if isinstance(item, dict) and "answer" in item:  # the result
                    ended = True
                    delta = stable.finish(item["answer"])
                    reason = oa.finish_reason(item["stats"], call.params["gen_length"], stable.stopped)
                    if delta or not chat:
                        yield _sse(chunk(delta, None if chat else reason))
                    if chat:
                        yield _sse(oa.chat_chunk(call.response_id, call.req.model, call.created, {}, reason))
                    if call.req.include_usage:
                        obj = "chat.completion.chunk" if chat else "text_completion"
                        yield _sse(oa.usage_chunk(call.response_id, call.req.model, call.created, obj, item["stats"]))
                    call.servicer.count("completed")
                    break
                if item.get("type") == "step":
                    delta = stable.step(item)
                    if delta:
                        yield _sse(chunk(delta))
                item = await next_item()
            yield _sse("[DONE]")
        finally:
            if not ended:  # the client went away mid-stream: the backend stops at its next event
                call.gone.set()
                call.servicer.count("cancelled")

    # -- routes ------------------------------------------------------------------------------------------------
    def _build(self) -> FastAPI:
        app = FastAPI(title="pdllm OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)

        @app.exception_handler(HttpError)
        async def on_http_error(request: Request, exc: HttpError):
            return exc.response()

        @app.exception_handler(HTTPException)
        async def on_starlette_error(request: Request, exc: HTTPException):
            code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
            message = f"{request.method} {request.url.path}: {exc.detail}"
            return HttpError(exc.status_code, message, "invalid_request_error", code).response()

        @app.get("/health")
        async def health():
            if self.servicer is None:
                return HttpError(503, "starting", "service_unavailable", "not_ready").response()
            return {"status": "ok"}

        @app.get("/v1/models")
        async def models(request: Request):
            info = self._ready(request).info
            return {"object": "list", "data": [oa.model_card(info, oa.now())]}

        @app.get("/v1/models/{model:path}")
        async def model(model: str, request: Request):
            info = self._ready(request).info
            if model not in (info.get("name"), info.get("model_id")):
                raise HttpError(404, f"unknown model {model!r}", "invalid_request_error", "model_not_found", "model")
            return oa.model_card(info, oa.now())

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            return await self._generate(request, "chat")

        @app.post("/v1/completions")
        async def completions(request: Request):
            return await self._generate(request, "completion")

        return app


async def _wait_disconnect(request: Request, gone: threading.Event) -> None:
    """Set `gone` when the client disconnects (uvicorn answers receive() with http.disconnect then)."""
    while True:
        message = await request.receive()
        if message.get("type") == "http.disconnect":
            gone.set()
            return


class HttpApiServer:
    """uvicorn serving an `HttpApi` in a background thread; `port` is the bound port (useful with port=0)."""

    def __init__(self, cfg: HttpApiConfig | None = None, servicer: PdllmServicer | None = None) -> None:
        self.cfg = cfg = cfg or HttpApiConfig()
        self.api = HttpApi(cfg, servicer)
        self.sock = socket.socket(socket.AF_INET6 if ":" in cfg.host else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((cfg.host, cfg.port))
        except OSError as exc:
            self.sock.close()
            raise InvalidRequest(f"--http-port: cannot listen on {cfg.host}:{cfg.port} ({exc.strerror})") from None
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(self.api.app, log_level="warning", access_log=False, lifespan="off")
        self.server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.cfg.host}]" if ":" in self.cfg.host else self.cfg.host
        return f"http://{host}:{self.port}"

    def attach(self, servicer: PdllmServicer) -> None:
        self.api.attach(servicer)

    def start(self, timeout_s: float = 30.0) -> HttpApiServer:
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, name="pdllm-http", daemon=True
        )
        self._thread.start()
        deadline, pause = time.monotonic() + timeout_s, threading.Event()
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise PdllmError(f"the HTTP API did not start on {self.url} within {timeout_s}s")
            pause.wait(0.02)
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout_s)
        self.api.close()
        self.sock.close()

    def __enter__(self) -> HttpApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
