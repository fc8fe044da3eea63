"""Prometheus metrics of the serving system, and one-call helpers that other modules use to record them.

Names follow Prometheus conventions (`pdllm_` prefix, base units, `_total` on counters), so rates are computed at
query time: tokens/s is `rate(pdllm_prefill_tokens_total[1m])`, steps/s is `rate(pdllm_denoise_steps_total[1m])`.

Processes. Every process records into its own registry (`REGISTRY`, not prometheus_client's global one, so only
pdllm metrics are exported and nothing else in a process can collide with them). Only the API server process
serves /metrics (`start_metrics_server`). Ray actors run in other processes: each actor returns `snapshot()` inside
the status dict it already reports (`{"metrics": metrics.snapshot(), ...}`), and the API server registers a
callable that gathers those snapshots (`add_remote_source(lambda: [...])`); at every scrape their samples are added
to the local ones (pdllm.observability.aggregate says why summing is right). One exporter, no multiprocess
directory, no extra ports to discover, and an actor that stops answering simply stops contributing (its health
gauge, set by whoever polls it, says so).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector

from pdllm.observability.aggregate import SNAPSHOT_VERSION, family_samples, merge

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry(auto_describe=True)

TRANSPORTS = ("local", "grpc", "nccl", "ipc")
BATCH_STATES = ("pending", "leased", "done", "failed", "cancelled")
OUTCOMES = ("ok", "error", "cancelled")

# Latency buckets: from a few ms (one denoising step of a small model) to minutes (a 128K-token cold request).
_REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, float("inf"))
_STEP_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, float("inf"))

REQUEST_SECONDS = Histogram(
    "pdllm_request_seconds",
    "Wall time of one generation request, from arrival to the final answer.",
    ["outcome"],
    buckets=_REQUEST_BUCKETS,
    registry=REGISTRY,
)
FIRST_STEP_SECONDS = Histogram(
    "pdllm_request_first_step_seconds",
    "Time from a request's arrival to its first denoising step (queueing + tokenize + prefill + fetch).",
    buckets=_REQUEST_BUCKETS,
    registry=REGISTRY,
)
DENOISE_STEPS = Counter("pdllm_denoise_steps", "Denoising steps run (rate = steps/s).", registry=REGISTRY)
DENOISE_STEP_SECONDS = Histogram(
    "pdllm_denoise_step_seconds", "Wall time of one denoising step.", buckets=_STEP_BUCKETS, registry=REGISTRY
)
PREFILL_TOKENS = Counter(
    "pdllm_prefill_tokens", "Context tokens encoded by prefill (rate = prefill tokens/s).", registry=REGISTRY
)
PREFILL_CHUNKS = Counter("pdllm_prefill_chunks", "Context chunks encoded by prefill.", registry=REGISTRY)
CHUNK_CACHE = Counter(
    "pdllm_chunk_cache_lookups",
    "Chunk KV lookups by result: hit (KV already existed somewhere) or miss (had to be prefilled).",
    ["result"],
    registry=REGISTRY,
)
FETCH_BYTES = Counter(
    "pdllm_kv_fetch_bytes",
    "Bytes of chunk KV moved to a decode actor, by transport (local memory, gRPC stream, NCCL).",
    ["transport"],
    registry=REGISTRY,
)
FETCHES = Counter("pdllm_kv_fetches", "Chunk KV fetches, by transport.", ["transport"], registry=REGISTRY)
QUEUE_DEPTH = Gauge("pdllm_queue_depth", "Items waiting in a queue, by queue name.", ["queue"], registry=REGISTRY)
BATCH_JOBS = Gauge("pdllm_batch_jobs", "Batch jobs by state (from the batch store).", ["state"], registry=REGISTRY)
ACTOR_UP = Gauge(
    "pdllm_actor_up", "1 if the actor answered its last health check, else 0.", ["actor"], registry=REGISTRY
)
ACTOR_DEATHS = Counter(
    "pdllm_actor_deaths", "Actor processes seen dead by the router, by role and cause.", ["role", "cause"],
    registry=REGISTRY,
)  # fmt: skip
ACTOR_RESTARTS = Counter(
    "pdllm_actor_restarts", "Actors back in placement as a new incarnation after a death, by role.", ["role"],
    registry=REGISTRY,
)  # fmt: skip

_sources: list[Callable[[], Iterable[Iterable[list]]]] = []
_sources_lock = threading.Lock()
_servers: list = []


# -- recording helpers: one call per event ---------------------------------------------------------------------
def observe_request(total_s: float, first_step_s: float | None = None, outcome: str = "ok") -> None:
    """A finished request: its total latency and, when it reached one, the time to its first denoising step."""
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome must be one of {OUTCOMES}, got {outcome!r}")
    REQUEST_SECONDS.labels(outcome=outcome).observe(total_s)
    if first_step_s is not None:
        FIRST_STEP_SECONDS.observe(first_step_s)


def record_step(step_s: float, steps: int = 1) -> None:
    """`steps` denoising steps that took `step_s` seconds each (a batched step counts each request's step)."""
    DENOISE_STEPS.inc(steps)
    DENOISE_STEP_SECONDS.observe(step_s)


def record_prefill(tokens: int, chunks: int = 1) -> None:
    """Context tokens (and chunks) that prefill encoded."""
    PREFILL_TOKENS.inc(tokens)
    PREFILL_CHUNKS.inc(chunks)


def record_cache(hit: bool, n: int = 1) -> None:
    """`n` chunk lookups that hit (KV existed) or missed."""
    CHUNK_CACHE.labels(result="hit" if hit else "miss").inc(n)


def record_fetch(transport: str, nbytes: int) -> None:
    """One KV fetch of `nbytes` over `transport` (local | grpc | nccl | ipc; anything else is a bug, not a label)."""
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
    FETCH_BYTES.labels(transport=transport).inc(nbytes)
    FETCHES.labels(transport=transport).inc()


def set_queue_depth(name: str, n: int) -> None:
    """Current depth of the queue `name` (e.g. api_waiting, prefill, decode, batch_pending)."""
    QUEUE_DEPTH.labels(queue=name).set(n)


def set_batch_jobs(state_counts: Mapping[str, int]) -> None:
    """Batch jobs per state; the known states absent from `state_counts` are set to 0."""
    for state in BATCH_STATES:
        BATCH_JOBS.labels(state=state).set(int(state_counts.get(state, 0)))
    for state, n in state_counts.items():
        if state not in BATCH_STATES:
            BATCH_JOBS.labels(state=state).set(int(n))


def set_actor_health(actor: str, ok: bool) -> None:
    """Health of one actor (its stable name, e.g. prefill-0), as seen by whoever polled it."""
    ACTOR_UP.labels(actor=actor).set(1 if ok else 0)


def record_actor_death(role: str, cause: str) -> None:
    ACTOR_DEATHS.labels(role=role, cause=cause).inc()


def record_actor_restart(role: str) -> None:
    ACTOR_RESTARTS.labels(role=role).inc()


def forget_actor(actor: str) -> None:
    """Drop an actor removed on purpose (scale-down), so it stops showing as down."""
    try:
        ACTOR_UP.remove(actor)
    except KeyError:
        pass


# -- other processes -------------------------------------------------------------------------------------------
def _origin() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def snapshot() -> dict:
    """This process's samples, plain data: what a Ray actor puts under "metrics" in its status dict."""
    return {"v": SNAPSHOT_VERSION, "origin": _origin(), "samples": family_samples(REGISTRY.collect())}


def add_remote_source(source: Callable[[], Iterable[Mapping]]) -> None:
    """Register a callable returning other processes' `snapshot()` dicts, called at every scrape.

    A source that raises is skipped for that scrape (logged), so a slow or dead actor never breaks /metrics.
    A snapshot taken in this very process (an in-process router reporting itself) is skipped: it is already local.
    `pdllm_actor_up` belongs to the poller: set it here from what the actors answered, never inside an actor.
    """
    with _sources_lock:
        _sources.append(source)


def clear_remote_sources() -> None:
    with _sources_lock:
        _sources.clear()


def _remote_samples() -> list[list[list]]:
    with _sources_lock:
        sources = list(_sources)
    out, me = [], _origin()
    for source in sources:
        try:
            for snap in source():
                if snap and snap.get("v") == SNAPSHOT_VERSION and snap.get("origin") != me:
                    out.append(snap.get("samples", []))
        except Exception:  # a scrape must never fail because one actor did
            log.warning("metrics source %r failed; its samples are left out of this scrape", source, exc_info=True)
    return out


class _Exported(Collector):
    """What /metrics serves: this process's registry plus every remote source's samples."""

    def collect(self):
        return merge(REGISTRY.collect(), _remote_samples())


EXPORT_REGISTRY = CollectorRegistry(auto_describe=False)
EXPORT_REGISTRY.register(_Exported())


def start_metrics_server(port: int, host: str = "127.0.0.1") -> int:
    """Serve /metrics over HTTP in a daemon thread; returns the bound port (port 0 picks a free one)."""
    httpd, _thread = start_http_server(port, addr=host, registry=EXPORT_REGISTRY)
    _servers.append(httpd)
    return int(httpd.server_port)


def stop_metrics_servers() -> None:
    """Stop every server this process started (tests; clean shutdown)."""
    while _servers:
        httpd = _servers.pop()
        httpd.shutdown()
        httpd.server_close()
