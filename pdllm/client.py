"""Python clients of the pdllm.v1 API, sync (`Client`) and asyncio (`AsyncClient`).

Every call has a deadline (the client's `timeout_s` unless the call gives one); a call that fails with UNAVAILABLE
(server starting, restarting, connection dropped) is retried with exponential backoff and jitter inside that
deadline; every other status is final and raised as `ApiError` (a PdllmError, so the CLI prints one line).

    import os
    from pdllm.client import Client

    context = "The pass key is 71432. Remember it. " * 20
    with Client(os.environ.get("PDLLM_SERVER", "127.0.0.1:50051"), auth_token=os.environ["PDLLM_AUTH_TOKEN"]) as c:
        print(c.generate(context, "What is the pass key?", gen_length=32, steps=32)["answer"])
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import grpc

from pdllm.cluster.api import convert as conv
from pdllm.cluster.common.auth import make_channel, secure_channel_credentials, token_metadata
from pdllm.errors import PdllmError
from pdllm.proto import pdllm_api_pb2 as pb
from pdllm.proto import pdllm_api_pb2_grpc as pb_grpc

DEFAULT_ADDRESS = "127.0.0.1:50051"
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})


class ApiError(PdllmError):
    """A call the server answered with a non-OK status (or that ran out of retries)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


def document_ref(content: str | bytes) -> str:
    """The id of a shared document: the sha256 of its UTF-8 bytes (what the server checks)."""
    raw = content.encode("utf-8") if isinstance(content, str) else content
    return hashlib.sha256(raw).hexdigest()


def _raw(text: str | bytes) -> bytes:
    return text if isinstance(text, bytes) else text.encode("utf-8")


def _read_ca(tls_ca: str | bytes | Path | None) -> bytes | None:
    if tls_ca is None or isinstance(tls_ca, bytes):
        return tls_ca
    return Path(tls_ca).read_bytes()


def generate_request(context, question, params: dict | None, model: str = "", request_id: str = ""):
    return pb.GenerateRequest(
        context=_raw(context),
        question=_raw(question),
        params=conv.params_to_proto(params),
        model=model,
        request_id=request_id,
    )


def batch_request(batch_id: str, jobs: list[dict], documents: dict | None = None, default_params: dict | None = None):
    """`jobs`: dicts {id, context | document_ref, question, params}; `documents`: {ref: text} sent once each."""
    msgs = []
    for job in jobs:
        msg = pb.BatchJob(id=str(job.get("id", "")), question=_raw(job.get("question", "")))
        msg.params.CopyFrom(conv.params_to_proto(job.get("params")))
        if job.get("document_ref"):
            msg.document_ref = job["document_ref"]
        else:
            msg.context = _raw(job.get("context", ""))
        msgs.append(msg)
    docs = [pb.Document(ref=ref, content=_raw(text)) for ref, text in (documents or {}).items()]
    return pb.SubmitBatchRequest(
        batch_id=batch_id, jobs=msgs, documents=docs, default_params=conv.params_to_proto(default_params)
    )


def _backoff(attempt: int, base: float, cap: float) -> float:
    return random.uniform(0, min(cap, base * 2**attempt))  # full jitter


def _channel_options(max_message_bytes: int, target_name: str | None) -> list:
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]
    if target_name:
        options.append(("grpc.ssl_target_name_override", target_name))
    return options


class Client:
    """Blocking client. `tls_ca`: PEM bytes or a path (TLS on); `tls=True` alone trusts the system roots."""

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        auth_token: str | None = None,
        tls_ca: str | bytes | Path | None = None,
        tls: bool = False,
        timeout_s: float = 600.0,
        retries: int = 4,
        backoff_s: float = 0.2,
        max_backoff_s: float = 5.0,
        max_message_bytes: int = 64 << 20,
        tls_target_name: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """`clock` and `sleep` time the retries and the deadline (a test gives fakes to check them without waiting)."""
        ca = _read_ca(tls_ca)
        self.clock, self.sleep = clock, sleep
        self.timeout_s, self.retries = timeout_s, retries
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        if ca is None and tls:
            options = _channel_options(max_message_bytes, tls_target_name)
            creds = secure_channel_credentials(None, auth_token)
            self.channel = grpc.secure_channel(address, creds, options=options)
        else:
            options = _channel_options(max_message_bytes, tls_target_name)
            self.channel = make_channel(address, auth_token, ca, options)
        self.stub = pb_grpc.PdllmStub(self.channel)

    def _call(self, method: Callable, request, timeout_s: float | None):
        deadline = self.clock() + (timeout_s or self.timeout_s)
        attempt = 0
        while True:
            left = deadline - self.clock()
            try:
                return method(request, timeout=max(left, 0.001))
            except grpc.RpcError as err:
                pause = _backoff(attempt, self.backoff_s, self.max_backoff_s)
                if err.code() not in RETRYABLE or attempt >= self.retries or self.clock() + pause >= deadline:
                    raise ApiError(err.code(), err.details() or "") from None
                self.sleep(pause)
                attempt += 1

    def generate(
        self,
        context: str | bytes,
        question: str | bytes,
        params: dict | None = None,
        model: str = "",
        request_id: str = "",
        timeout_s: float | None = None,
        **param_kwargs,
    ) -> dict:
        """{"request_id", "answer", "stats"}; params as a dict or keywords (gen_length=16, steps=16, ...)."""
        request = generate_request(context, question, {**(params or {}), **param_kwargs}, model, request_id)
        return conv.response_to_dict(self._call(self.stub.Generate, request, timeout_s))

    def generate_stream(
        self,
        context: str | bytes,
        question: str | bytes,
        params: dict | None = None,
        model: str = "",
        request_id: str = "",
        timeout_s: float | None = None,
        **param_kwargs,
    ) -> Iterator[dict]:
        """Event dicts (type queued | prefill | step | final); retried on UNAVAILABLE only before the first event."""
        request = generate_request(context, question, {**(params or {}), **param_kwargs}, model, request_id)
        deadline = self.clock() + (timeout_s or self.timeout_s)
        attempt, seen = 0, False
        while True:
            try:
                for msg in self.stub.GenerateStream(request, timeout=max(deadline - self.clock(), 0.001)):
                    seen = True
                    yield conv.event_to_dict(msg)
                return
            except grpc.RpcError as err:
                pause = _backoff(attempt, self.backoff_s, self.max_backoff_s)
                retry = err.code() in RETRYABLE and not seen and attempt < self.retries
                if not retry or self.clock() + pause >= deadline:
                    raise ApiError(err.code(), err.details() or "") from None
                self.sleep(pause)
                attempt += 1

    def submit_batch(
        self,
        batch_id: str,
        jobs: list[dict],
        documents: dict | None = None,
        default_params: dict | None = None,
        timeout_s: float | None = None,
    ) -> dict:
        """{"batch": status, "created": bool}; resubmitting the same id and jobs returns created=False."""
        request = batch_request(batch_id, jobs, documents, default_params)
        reply = self._call(self.stub.SubmitBatch, request, timeout_s)
        return {"batch": conv.batch_status_to_dict(reply.batch), "created": reply.created}

    def get_batch(self, batch_id: str, timeout_s: float | None = None) -> dict:
        reply = self._call(self.stub.GetBatch, pb.GetBatchRequest(batch_id=batch_id), timeout_s)
        return conv.batch_status_to_dict(reply.batch)

    def batch_results(self, batch_id: str, page: int = 500, timeout_s: float | None = None) -> Iterator[dict]:
        """Every job's result in submission order, fetched page by page."""
        offset = 0
        while offset >= 0:
            request = pb.GetBatchRequest(batch_id=batch_id, include_results=True, offset=offset, limit=page)
            reply = self._call(self.stub.GetBatch, request, timeout_s)
            yield from (conv.job_result_to_dict(r) for r in reply.results)
            offset = reply.next_offset

    def list_batches(self, limit: int = 100, timeout_s: float | None = None) -> list[dict]:
        reply = self._call(self.stub.ListBatches, pb.ListBatchesRequest(limit=limit), timeout_s)
        return [conv.batch_status_to_dict(b) for b in reply.batches]

    def cancel_batch(self, batch_id: str, timeout_s: float | None = None) -> dict:
        reply = self._call(self.stub.CancelBatch, pb.CancelBatchRequest(batch_id=batch_id), timeout_s)
        return conv.batch_status_to_dict(reply)

    def health(self, timeout_s: float | None = None) -> dict:
        reply = self._call(self.stub.Health, pb.HealthRequest(), timeout_s)
        return {"serving": reply.serving, **conv.struct_to_dict(reply.detail)}

    def model_info(self, timeout_s: float | None = None) -> dict:
        reply = self._call(self.stub.ModelInfo, pb.ModelInfoRequest(), timeout_s)
        return conv.struct_to_dict(reply.detail) | {"name": reply.name, "model_id": reply.model_id}

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """asyncio client with the same calls and retry rules: `async with AsyncClient(addr) as c: await c.generate(..)`."""

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        auth_token: str | None = None,
        tls_ca: str | bytes | Path | None = None,
        tls: bool = False,
        timeout_s: float = 600.0,
        retries: int = 4,
        backoff_s: float = 0.2,
        max_backoff_s: float = 5.0,
        max_message_bytes: int = 64 << 20,
        tls_target_name: str | None = None,
    ) -> None:
        ca = _read_ca(tls_ca)
        self.timeout_s, self.retries = timeout_s, retries
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        options = _channel_options(max_message_bytes, tls_target_name)
        if ca is not None or tls:
            creds = secure_channel_credentials(ca, auth_token)
            self.channel = grpc.aio.secure_channel(address, creds, options=options)
            self._metadata: list = []
        else:
            self.channel = grpc.aio.insecure_channel(address, options=options)
            self._metadata = token_metadata(auth_token)
        self.stub = pb_grpc.PdllmStub(self.channel)

    async def _call(self, method, request, timeout_s: float | None):
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        attempt = 0
        while True:
            left = deadline - time.monotonic()
            try:
                return await method(request, timeout=max(left, 0.001), metadata=self._metadata)
            except grpc.RpcError as err:
                pause = _backoff(attempt, self.backoff_s, self.max_backoff_s)
                if err.code() not in RETRYABLE or attempt >= self.retries or time.monotonic() + pause >= deadline:
                    raise ApiError(err.code(), err.details() or "") from None
                await asyncio.sleep(pause)
                attempt += 1

    async def generate(
        self,
        context,
        question,
        params: dict | None = None,
        model: str = "",
        request_id: str = "",
        timeout_s: float | None = None,
        **param_kwargs,
    ) -> dict:
        request = generate_request(context, question, {**(params or {}), **param_kwargs}, model, request_id)
        return conv.response_to_dict(await self._call(self.stub.Generate, request, timeout_s))

    async def generate_stream(
        self,
        context,
        question,
        params: dict | None = None,
        model: str = "",
        request_id: str = "",
        timeout_s: float | None = None,
        **param_kwargs,
    ) -> AsyncIterator[dict]:
        request = generate_request(context, question, {**(params or {}), **param_kwargs}, model, request_id)
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        attempt, seen = 0, False
        while True:
            try:
                call = self.stub.GenerateStream(
                    request, timeout=max(deadline - time.monotonic(), 0.001), metadata=self._metadata
                )
                async for msg in call:
                    seen = True
                    yield conv.event_to_dict(msg)
                return
            except grpc.RpcError as err:
                pause = _backoff(attempt, self.backoff_s, self.max_backoff_s)
                retry = err.code() in RETRYABLE and not seen and attempt < self.retries
                if not retry or time.monotonic() + pause >= deadline:
                    raise ApiError(err.code(), err.details() or "") from None
                await asyncio.sleep(pause)
                attempt += 1

    async def submit_batch(
        self,
        batch_id: str,
        jobs: list[dict],
        documents: dict | None = None,
        default_params: dict | None = None,
        timeout_s: float | None = None,
    ) -> dict:
        reply = await self._call(
            self.stub.SubmitBatch, batch_request(batch_id, jobs, documents, default_params), timeout_s
        )
        return {"batch": conv.batch_status_to_dict(reply.batch), "created": reply.created}

    async def get_batch(self, batch_id: str, timeout_s: float | None = None) -> dict:
        reply = await self._call(self.stub.GetBatch, pb.GetBatchRequest(batch_id=batch_id), timeout_s)
        return conv.batch_status_to_dict(reply.batch)

    async def health(self, timeout_s: float | None = None) -> dict:
        reply = await self._call(self.stub.Health, pb.HealthRequest(), timeout_s)
        return {"serving": reply.serving, **conv.struct_to_dict(reply.detail)}

    async def model_info(self, timeout_s: float | None = None) -> dict:
        reply = await self._call(self.stub.ModelInfo, pb.ModelInfoRequest(), timeout_s)
        return conv.struct_to_dict(reply.detail) | {"name": reply.name, "model_id": reply.model_id}

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def generate_via_server(
    addr: str,
    context: str,
    question: str,
    params: dict | None = None,
    auth_token: str | None = None,
    tls_ca: str | bytes | Path | None = None,
    tls: bool = False,
    timeout_s: float | None = None,
) -> dict:
    """One answer from a running server: {"answer", "stats", "request_id"} (what `pdllm generate --server` prints)."""
    with Client(addr, auth_token=auth_token, tls_ca=tls_ca, tls=tls, timeout_s=timeout_s or 600.0) as client:
        return client.generate(context, question, params or {})
