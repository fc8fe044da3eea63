"""The pdllm.v1 gRPC server: validation at the edge, admission control, auth, TLS, reflection, standard health.

It drives any `GenerationBackend` (in-process model or the Ray cluster's router) and, when given one, a
`BatchStore` for batch jobs. Sync gRPC with a bounded thread pool: generation is CPU/GPU-bound, not I/O-bound.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pdllm.cluster import api_convert as conv
from pdllm.cluster.api_admission import Admission
from pdllm.cluster.api_backend import BackendBusy, DeadlineExceeded, GenerationBackend, RequestCancelled
from pdllm.cluster.api_params import ApiLimits, complete_params, decode_text
from pdllm.cluster.auth import TokenAuthInterceptor, server_credentials
from pdllm.cluster.batch_store import BatchConflict, BatchNotFound
from pdllm.proto import pdllm_api_pb2 as pb
from pdllm.proto import pdllm_api_pb2_grpc as pb_grpc

from pdllm.errors import InvalidRequest

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Pdllm"].full_name


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
    limits: ApiLimits = field(default_factory=ApiLimits)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, InvalidRequest):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, BackendBusy):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, DeadlineExceeded):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc)
    if isinstance(exc, RequestCancelled):
        return grpc.StatusCode.CANCELLED, str(exc)
    if isinstance(exc, BatchNotFound):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, BatchConflict):
        return grpc.StatusCode.ALREADY_EXISTS, str(exc)
    log.exception("internal error serving a request", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}"


class PdllmServicer(pb_grpc.PdllmServicer):
    def __init__(self, backend: GenerationBackend, cfg: ApiServerConfig, batches=None) -> None:
        self.backend, self.cfg, self.batches = backend, cfg, batches
        self.admission = Admission(cfg.max_running, cfg.max_waiting)
        self.info = backend.model_info()
        self.modes = tuple(self.info.get("modes") or ("vanilla",))
        self.counters = {"completed": 0, "failed": 0, "cancelled": 0, "deadline_exceeded": 0, "invalid": 0}
        self._lock = threading.Lock()

    # -- helpers -----------------------------------------------------------------------------------------------
    def _count(self, key: str) -> None:
        with self._lock:
            self.counters[key] += 1

    def _abort(self, context: grpc.ServicerContext, exc: BaseException):
        code, message = status_for(exc)
        key = {
            grpc.StatusCode.INVALID_ARGUMENT: "invalid",
            grpc.StatusCode.DEADLINE_EXCEEDED: "deadline_exceeded",
            grpc.StatusCode.CANCELLED: "cancelled",
        }.get(code, "failed")
        self._count(key)
        context.abort(code, message)

    def _parse(self, request: pb.GenerateRequest) -> tuple[str, str, dict, str]:
        limits = self.cfg.limits
        if request.model and request.model not in (self.info.get("name"), self.info.get("model_id")):
            raise InvalidRequest(f"unknown model {request.model!r}; this server serves {self.info.get('name')!r}")
        context = decode_text("context", request.context, limits.max_context_bytes)
        question = decode_text("question", request.question, limits.max_question_bytes)
        params = complete_params(conv.params_to_dict(request.params), self.modes, limits)
        return context, question, params, request.request_id or uuid.uuid4().hex

    def _timeout(self, context: grpc.ServicerContext) -> float:
        left = context.time_remaining()
        return self.cfg.default_timeout_s if left is None else min(left, self.cfg.default_timeout_s)

    @staticmethod
    def _watch(context: grpc.ServicerContext, sink=None):
        """An on_event that stops the backend once the caller is gone, forwarding events to `sink`."""

        def on_event(event: dict) -> None:
            if not context.is_active():
                raise RequestCancelled("caller cancelled or disconnected")
            if sink is not None:
                sink(event)

        return on_event

    def _run(self, context, text, question, params, rid, on_queued=None, sink=None) -> pb.GenerateResponse:

        timeout = self._timeout(context)
        start = time.monotonic()
        with self.admission.slot(timeout, on_queued, alive=context.is_active) as queued_s:
            left = timeout - (time.monotonic() - start)
            result = self.backend.generate(text, question, params, rid, self._watch(context, sink), left)
        stats = {**result.get("stats", {}), "queue_seconds": round(queued_s, 4)}
        self._count("completed")
        return pb.GenerateResponse(request_id=rid, answer=result["answer"], stats=conv.stats_to_proto(stats))

    # -- generation --------------------------------------------------------------------------------------------
    def Generate(self, request, context):
        try:
            text, question, params, rid = self._parse(request)
            return self._run(context, text, question, params, rid)
        except Exception as exc:
            self._abort(context, exc)

    def GenerateStream(self, request, context):
        try:
            text, question, params, rid = self._parse(request)
        except Exception as exc:
            self._abort(context, exc)
        events: queue.Queue = queue.Queue()

        def work() -> None:
            try:
                final = self._run(
                    context,
                    text,
                    question,
                    params,
                    rid,
                    on_queued=lambda pos: events.put({"type": "queued", "position": pos}),
                    sink=events.put,
                )
                events.put(final)
            except BaseException as exc:  # handed to the serving thread, which maps it to a status
                events.put(exc)

        threading.Thread(target=work, name=f"pdllm-stream-{rid[:8]}", daemon=True).start()
        while True:
            item = events.get()
            if isinstance(item, BaseException):
                self._abort(context, item)
            if isinstance(item, pb.GenerateResponse):
                yield pb.GenerateEvent(request_id=rid, final=item)
                return
            yield conv.event_to_proto(rid, item)

    # -- batches -----------------------------------------------------------------------------------------------
    def _store(self):
        if self.batches is None:
            raise InvalidRequest("batch jobs are not enabled on this server (start it with a Redis URL)")
        return self.batches

    def SubmitBatch(self, request, context):
        from pdllm.cluster.batch_spec import jobs_from_request

        try:
            store = self._store()
            batch_id, jobs, documents = jobs_from_request(request, self.modes, self.cfg.limits)
            status, created = store.submit(batch_id, jobs, documents)
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
                counters = dict(self.counters)
            detail = {"backend": backend, "admission": self.admission.snapshot(), "requests": counters}
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
        pb_grpc.add_PdllmServicer_to_server(self.servicer, self.server)
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
        return self

    def stop(self, grace: float = 2.0) -> None:
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait(grace + 5)

    def wait(self) -> None:
        self.server.wait_for_termination()

    def __enter__(self) -> ApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
