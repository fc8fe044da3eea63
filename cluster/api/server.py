"""The pdllm.v1 gRPC server: validation at the edge, admission control, auth, TLS, reflection, standard health.

It drives any `GenerationBackend` (in-process model or the Ray cluster's router) and, when given one, a
`BatchStore` for batch jobs. `check_request` and `run_request` are the API-neutral part (limits bounded by the
model's maximum length, admission, request metrics): the HTTP API (cluster/api/http_api.py) serves through them too.
Sync gRPC with a bounded thread pool: generation is CPU/GPU-bound, not I/O-bound.

Requests arrive as raw bytes and are parsed here, so a message that is not a valid protobuf gets INVALID_ARGUMENT
naming the expected type (gRPC itself would answer an opaque INTERNAL). A stream's events pass through a bounded
box (old step events give way to new ones); a client that stops reading holds a serving thread only until the
stall watchdog cancels its call (`stream_stall_s`), and the backend stops with it. Health reports the counters that
show this: open streams, their worker threads, stalls, running and queued calls, this process's memory and threads;
every call ends in exactly one request counter (a stream whose client left counts as cancelled).
Error details are bounded (`MAX_DETAILS_CHARS`): a huge bad value quoted in full would push the status past the
client's metadata limit, and the client would see an opaque RESOURCE_EXHAUSTED instead of what was wrong.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pdllm.cluster.api import convert as conv
from pdllm.cluster.api.admission import Admission
from pdllm.cluster.api.backend import GenerationBackend
from pdllm.cluster.api.errors import status_for
from pdllm.cluster.api.params import ApiLimits, check_request_id, checked_params, decode_text
from pdllm.cluster.api.proto_check import wrong_wire_types
from pdllm.cluster.common.auth import TokenAuthInterceptor, server_credentials
from pdllm.cluster.common.event_box import EventBox
from pdllm.cluster.common.proc_stats import process_stats
from pdllm.proto import pdllm_api_pb2 as pb

from pdllm.errors import Cancelled, DeadlineExceeded, InvalidRequest
from pdllm.models.generation_defaults import KEYS as DECODING_KEYS
from pdllm.observability import metrics
from pdllm.observability.logs import request_context

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Pdllm"].full_name
MAX_DETAILS_CHARS = 1024  # status details sent back; gRPC clients refuse trailers over 8-16 KiB


@dataclass
class ApiServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051  # 0: any free port (see ApiServer.port)
    auth_token: str | None = None  # None: no authentication (loopback development only)
    tls_cert: bytes | None = None  # PEM; with tls_key: serve TLS only
    tls_key: bytes | None = None
    max_running: int = 1  # generation calls running at once (the backend's useful concurrency)
    max_waiting: int = 16  # queued beyond that; more: RESOURCE_EXHAUSTED
    max_message_bytes: int = 64 << 20  # both directions; larger messages: RESOURCE_EXHAUSTED from gRPC
    default_timeout_s: float = 600.0  # applies when the client sets no deadline
    results_page: int = 500
    stream_events: int = 16  # events buffered per stream before old step events are dropped
    stream_stall_s: float = 30.0  # a stream whose client accepts no event for this long is cancelled
    limits: ApiLimits = field(default_factory=ApiLimits)


def bounded(details: str, limit: int = MAX_DETAILS_CHARS) -> str:
    """`details` cut in the middle to at most about `limit` characters: the start names the field, the end says
    what was expected."""
    if len(details) <= limit:
        return details
    head, tail = details[: limit * 2 // 3], details[-(limit // 4) :]
    return f"{head} [... {len(details) - len(head) - len(tail)} characters cut ...] {tail}"


class UnknownModel(InvalidRequest):
    """A request named a model this server does not serve (gRPC: INVALID_ARGUMENT; HTTP: 404)."""


@dataclass
class _OpenStream:
    """A stream being served: the watchdog cancels it when one write has waited longer than the stall limit."""

    context: grpc.ServicerContext
    writing_since: float | None = None


class PdllmServicer:
    def __init__(self, backend: GenerationBackend, cfg: ApiServerConfig, batches=None) -> None:
        self.backend, self.cfg, self.batches = backend, cfg, batches
        self.admission = Admission(cfg.max_running, cfg.max_waiting)
        self.info = backend.model_info()
        self.modes = tuple(self.info.get("modes") or ("vanilla",))
        self.defaults = dict(self.info.get("defaults") or {})  # the backend's defaults, under each request's params
        self.limits = cfg.limits.for_model(self.info.get("max_length"))
        self.counters = {"completed": 0, "failed": 0, "cancelled": 0, "deadline_exceeded": 0, "invalid": 0}
        self.streams = {"open": 0, "workers": 0, "stalled": 0, "dropped_events": 0}
        self._open: dict[int, _OpenStream] = {}
        self._lock = threading.Lock()

    # -- helpers -----------------------------------------------------------------------------------------------
    def count(self, key: str) -> None:
        with self._lock:
            self.counters[key] += 1

    def _abort(self, context: grpc.ServicerContext, exc: BaseException):
        code, message = status_for(exc)
        key = {
            grpc.StatusCode.INVALID_ARGUMENT: "invalid",
            grpc.StatusCode.DEADLINE_EXCEEDED: "deadline_exceeded",
            grpc.StatusCode.CANCELLED: "cancelled",
        }.get(code, "failed")
        self.count(key)
        context.abort(code, bounded(message))

    def _parse(self, request: pb.GenerateRequest) -> tuple[str, str, dict, str]:
        params = conv.params_to_dict(request.params)
        return self.check_request(request.model, request.context, request.question, params, request.request_id)

    def check_request(
        self, model: str, context: bytes | str, question: bytes | str, params: dict, request_id: str = ""
    ) -> tuple[str, str, dict, str]:
        """(context, question, complete params, request id) of a request from any API, checked against the same
        limits (bounded by the model's maximum length); InvalidRequest names what is wrong. An unknown model is
        `UnknownModel`, so an API can answer it with its own not-found code."""
        limits = self.limits
        if model and model not in (self.info.get("name"), self.info.get("model_id")):
            raise UnknownModel(f"unknown model {model!r}; this server serves {self.info.get('name')!r}")
        context = decode_text("context", context, limits.max_context_bytes)
        question = decode_text("question", question, limits.max_question_bytes)
        params = checked_params(params, self.modes, limits, self.defaults)
        return context, question, params, check_request_id(request_id, limits) or uuid.uuid4().hex

    def _timeout(self, context: grpc.ServicerContext) -> float:
        left = context.time_remaining()
        return self.cfg.default_timeout_s if left is None else min(left, self.cfg.default_timeout_s)

    def _run(self, context, text, question, params, rid, on_queued=None, sink=None) -> pb.GenerateResponse:
        timeout = self._timeout(context)
        result = self.run_request(text, question, params, rid, timeout, context.is_active, on_queued, sink)
        return pb.GenerateResponse(request_id=rid, answer=result["answer"], stats=conv.stats_to_proto(result["stats"]))

    def run_request(
        self,
        text: str,
        question: str,
        params: dict,
        rid: str,
        timeout_s: float,
        alive: Callable[[], bool],
        on_queued: Callable[[int], None] | None = None,
        sink: Callable[[dict], None] | None = None,
    ) -> dict:
        """One checked request through admission control and the backend, recorded in the request metrics, for
        any API: {"answer", "stats"} (stats with queue_seconds). `alive()` false means the caller left: the
        backend stops at its next event."""
        start = time.monotonic()
        first_step: list[float] = []

        def forward(event: dict) -> None:
            if not alive():
                raise Cancelled("caller cancelled or disconnected")
            if event.get("type") == "step" and not first_step:
                first_step.append(time.monotonic() - start)
            if sink is not None:
                sink(event)

        outcome = "error"
        try:
            with request_context(rid), self.admission.slot(timeout_s, on_queued, alive=alive) as queued_s:
                self._publish_admission()
                left = timeout_s - (time.monotonic() - start)
                result = self.backend.generate(text, question, params, rid, forward, left)
            outcome = "ok"
        except (Cancelled, DeadlineExceeded):
            outcome = "cancelled"
            raise
        finally:
            self._publish_admission()
            metrics.observe_request(time.monotonic() - start, first_step[0] if first_step else None, outcome)
        return {"answer": result["answer"], "stats": {**result.get("stats", {}), "queue_seconds": round(queued_s, 4)}}

    def _publish_admission(self) -> None:
        snap = self.admission.snapshot()
        metrics.set_queue_depth("api_running", snap["running"])
        metrics.set_queue_depth("api_waiting", snap["waiting"])

    # -- generation --------------------------------------------------------------------------------------------
    def Generate(self, request, context):
        try:
            text, question, params, rid = self._parse(request)
            reply = self._run(context, text, question, params, rid)
            self.count("completed")
            return reply
        except Exception as exc:
            self._abort(context, exc)

    def GenerateStream(self, request, context):
        try:
            text, question, params, rid = self._parse(request)
        except Exception as exc:
            self._abort(context, exc)
        box = EventBox(self.cfg.stream_events)

        def work() -> None:
            try:
                on_queued = lambda pos: box.put_step({"type": "queued", "position": pos})  # noqa: E731
                box.put_final(self._run(context, text, question, params, rid, on_queued, box.put_step))
            except BaseException as exc:  # handed to the serving thread, which maps it to a status
                box.put_final(exc)
            finally:
                with self._lock:
                    self.streams["workers"] -= 1

        entry = _OpenStream(context)
        with self._lock:
            self._open[id(entry)] = entry
            self.streams["open"] += 1
            self.streams["workers"] += 1
        ended = False  # the call got its answer or an error status; else the client left (gone, or stalled)
        try:
            try:
                threading.Thread(target=work, name=f"pdllm-stream-{rid[:8]}", daemon=True).start()
            except BaseException:
                with self._lock:
                    self.streams["workers"] -= 1
                raise
            while True:
                item = box.get()
                if isinstance(item, BaseException):
                    ended = True
                    self._abort(context, item)
                msg = (
                    pb.GenerateEvent(request_id=rid, final=item)
                    if isinstance(item, pb.GenerateResponse)
                    else conv.event_to_proto(rid, item)
                )
                entry.writing_since = time.monotonic()
                yield msg  # blocks while the client's flow-control window is full
                entry.writing_since = None
                if isinstance(item, pb.GenerateResponse):
                    ended = True
                    self.count("completed")
                    return
        finally:
            with self._lock:
                self._open.pop(id(entry), None)
                self.streams["open"] -= 1
                self.streams["dropped_events"] += box.dropped
                if not ended:  # closed by gRPC while writing: the worker stops at its next event
                    self.counters["cancelled"] += 1

    def cancel_stalled(self) -> int:
        """Cancel every stream whose current write has waited longer than `stream_stall_s` (the client is not
        reading); the backend notices through its event callback and stops. Returns how many were cancelled."""
        now, stalled = time.monotonic(), []
        with self._lock:
            for entry in self._open.values():
                since = entry.writing_since
                if since is not None and now - since > self.cfg.stream_stall_s:
                    stalled.append(entry)
                    entry.writing_since = None
                    self.streams["stalled"] += 1
        for entry in stalled:
            log.warning("cancelling a stream whose client read nothing for %.1fs", self.cfg.stream_stall_s)
            entry.context.cancel()
        return len(stalled)

    # -- batches -----------------------------------------------------------------------------------------------
    def _store(self):
        if self.batches is None:
            raise InvalidRequest("batch jobs are not enabled on this server (start it with a Redis URL)")
        return self.batches

    def SubmitBatch(self, request, context):

        try:
            store = self._store()
            for key, value in self.defaults.items():  # the backend's defaults, under the batch's own
                if key not in DECODING_KEYS and not request.default_params.HasField(key):
                    setattr(request.default_params, key, value)
            status, created = store.submit_request(request, self.modes, self.limits)
            return pb.SubmitBatchResponse(batch=conv.batch_status_to_proto(status), created=created)
        except Exception as exc:
            self._abort(context, exc)

    def GetBatch(self, request, context):
        try:
            store = self._store()
            status = store.status(request.batch_id)
            reply = pb.GetBatchResponse(batch=conv.batch_status_to_proto(status), next_offset=-1)
            if request.include_results:
                if request.offset < 0 or request.limit < 0:
                    raise InvalidRequest("offset and limit must be >= 0")
                limit = min(request.limit or self.cfg.results_page, self.cfg.results_page)
                results, next_offset = store.results(request.batch_id, request.offset, limit)
                reply.results.extend(conv.job_result_to_proto(r) for r in results)
                reply.next_offset = next_offset
            return reply
        except Exception as exc:
            self._abort(context, exc)

    def ListBatches(self, request, context):
        try:
            limit = min(request.limit or 100, 1000)
            batches = self._store().list(limit)
            return pb.ListBatchesResponse(batches=[conv.batch_status_to_proto(s) for s in batches])
        except Exception as exc:
            self._abort(context, exc)

    def CancelBatch(self, request, context):
        try:
            return conv.batch_status_to_proto(self._store().cancel(request.batch_id))
        except Exception as exc:
            self._abort(context, exc)

    # -- introspection -----------------------------------------------------------------------------------------
    def Health(self, request, context):
        try:
            backend = self.backend.health()
            with self._lock:
                counters, streams = dict(self.counters), dict(self.streams)
            detail = {
                "backend": backend,
                "admission": self.admission.snapshot(),
                "requests": counters,
                "streams": streams,
                "process": process_stats(),
            }
            if self.batches is not None:
                detail["batches"] = self.batches.health()
            serving = bool(backend.get("serving", False))
            return pb.HealthResponse(serving=serving, detail=conv.struct_from_dict(detail))
        except Exception as exc:
            self._abort(context, exc)

    def ModelInfo(self, request, context):
        info = self.info
        return pb.ModelInfoResponse(
            name=str(info.get("name", "")),
            model_id=str(info.get("model_id", "")),
            family=str(info.get("family", "")),
            modes=list(self.modes),
            max_context_tokens=int(info.get("max_context_tokens", 0)),
            detail=conv.struct_from_dict(info),
        )


def service_handler(servicer: PdllmServicer) -> grpc.GenericRpcHandler:
    """The Pdllm service with requests taken as raw bytes and parsed here: an undecodable message, or one with a
    known field of the wrong wire type, gets INVALID_ARGUMENT naming the expected type, counted like any other
    invalid request."""
    service = pb.DESCRIPTOR.services_by_name["Pdllm"]
    handlers = {}
    for method in service.methods:
        request_cls = getattr(pb, method.input_type.name)
        behaviour = getattr(servicer, method.name)

        def parse(raw: bytes, context, cls=request_cls, name=method.input_type.full_name):
            try:
                request = cls.FromString(raw)
            except DecodeError as exc:
                servicer.count("invalid")
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request is not a valid {name}: {exc}")
            wrong = wrong_wire_types(request)
            if wrong:
                servicer.count("invalid")
                fields = bounded(", ".join(wrong), 256)
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{name} has fields of the wrong type: {fields}")
            return request

        if method.server_streaming:

            def stream(raw, context, parse=parse, behaviour=behaviour):
                yield from behaviour(parse(raw, context), context)

            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                stream, response_serializer=lambda msg: msg.SerializeToString()
            )
        else:

            def unary(raw, context, parse=parse, behaviour=behaviour):
                return behaviour(parse(raw, context), context)

            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                unary, response_serializer=lambda msg: msg.SerializeToString()
            )
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


class ApiServer:
    """A started-on-demand gRPC server around a backend; `port` is the bound port (useful with port=0)."""

    def __init__(self, backend: GenerationBackend, cfg: ApiServerConfig | None = None, batches=None) -> None:
        self.cfg = cfg = cfg or ApiServerConfig()
        self.servicer = PdllmServicer(backend, cfg, batches)
        extra_calls = 16  # health, model info, batch calls beyond the generation slots and queue
        workers = cfg.max_running + cfg.max_waiting + extra_calls
        options = [
            ("grpc.max_receive_message_length", cfg.max_message_bytes),
            ("grpc.max_send_message_length", cfg.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        interceptors = [TokenAuthInterceptor(cfg.auth_token)] if cfg.auth_token else []
        self.server = grpc.server(
            futures.ThreadPoolExecutor(workers, thread_name_prefix="pdllm-rpc"),
            interceptors=interceptors,
            options=options,
            maximum_concurrent_rpcs=workers,
        )
        self.server.add_generic_rpc_handlers((service_handler(self.servicer),))
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, self.server)
        address = f"{cfg.host}:{cfg.port}"
        if cfg.tls_cert is not None or cfg.tls_key is not None:
            if not (cfg.tls_cert and cfg.tls_key):
                raise InvalidRequest("TLS needs both a certificate and a private key")
            self.port = self.server.add_secure_port(address, server_credentials(cfg.tls_cert, cfg.tls_key))
        else:
            self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise InvalidRequest(f"cannot listen on {address} (in use or not allowed)")

    @property
    def address(self) -> str:
        return f"{self.cfg.host}:{self.port}"

    def start(self) -> ApiServer:
        self.server.start()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._stopped = threading.Event()
        self._watchdog = threading.Thread(target=self._watch_streams, name="pdllm-stream-watchdog", daemon=True)
        self._watchdog.start()
        return self

    def _watch_streams(self) -> None:
        period = min(1.0, max(0.05, self.cfg.stream_stall_s / 4))
        while not self._stopped.wait(period):
            try:
                self.servicer.cancel_stalled()
            except Exception:  # the watchdog must outlive any one bad stream
                log.exception("stream watchdog")

    def stop(self, grace: float = 2.0) -> None:
        self.health.enter_graceful_shutdown()
        if getattr(self, "_stopped", None) is not None:
            self._stopped.set()
        self.server.stop(grace).wait(grace + 5)

    def wait(self) -> None:
        self.server.wait_for_termination()

    def __enter__(self) -> ApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
