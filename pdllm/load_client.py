"""Many concurrent clients against one pdllm server, for a fixed number of requests: the load benchmark
(benchmarks/bench_load.py) and its bounded test run this same code.

Each client is a thread with its own `Client` (its own channel and HTTP/2 connection, as separate processes would
have); the requests are dealt round-robin, so every client sends the same number. A request's outcome is its answer
or the gRPC status it failed with; nothing is retried (`retries=0`), so an error the server made is counted, not
hidden. `api="http"` sends the same requests to the OpenAI-compatible HTTP API instead (`address` is its base URL,
`http://host:port`), each client its own `openai.OpenAI` (the official client, its own connection pool), as
completions with the question in the `question` field, so each answer is the one gRPC gives for the same request.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field

from pdllm.client import ApiError, Client


@dataclass(frozen=True)
class LoadRequest:
    context: str
    question: str
    params: dict


@dataclass
class RoundResult:
    """What one round of `run_round` saw, in the order the requests were given."""

    answers: list[str | None]
    latencies_s: list[float]  # of answered requests
    errors: list[str] = field(default_factory=list)  # "request i: CODE: details"
    wall_s: float = 0.0

    def percentile(self, q: float) -> float:
        """The q-quantile (0..1) of the answered requests' latencies, nearest rank; nan without any."""
        if not self.latencies_s:
            return float("nan")
        ranked = sorted(self.latencies_s)
        return ranked[min(len(ranked) - 1, max(0, math.ceil(q * len(ranked)) - 1))]


class _GrpcSession:
    error = ApiError

    def __init__(self, address: str, auth_token: str | None, timeout_s: float) -> None:
        self.client = Client(address, auth_token=auth_token, timeout_s=timeout_s, retries=0)

    def answer(self, req: LoadRequest) -> str:
        return self.client.generate(req.context, req.question, req.params)["answer"]

    def close(self) -> None:
        self.client.close()


class _HttpSession:
    def __init__(self, base_url: str, auth_token: str | None, timeout_s: float) -> None:
        import openai

        self.error = openai.OpenAIError
        self.client = openai.OpenAI(
            base_url=base_url.rstrip("/") + "/v1", api_key=auth_token or "none", timeout=timeout_s, max_retries=0
        )
        self.model = self.client.models.list().data[0].id

    def answer(self, req: LoadRequest) -> str:
        extra = {k: v for k, v in req.params.items() if k != "gen_length"}
        reply = self.client.completions.create(
            model=self.model,
            prompt=req.context,
            max_tokens=req.params.get("gen_length"),
            extra_body={**extra, "question": req.question},
        )
        return reply.choices[0].text

    def close(self) -> None:
        self.client.close()


def run_round(
    address: str,
    requests: list[LoadRequest],
    clients: int,
    auth_token: str | None = None,
    timeout_s: float = 120.0,
    api: str = "grpc",
) -> RoundResult:
    """Send `requests` from `clients` concurrent clients (client k sends requests k, k + clients, ...), all starting
    together; every call has the deadline `timeout_s`. `api`: "grpc" (`address` host:port) or "http" (base URL)."""
    if clients < 1:
        raise ValueError("clients must be >= 1")
    if api not in ("grpc", "http"):
        raise ValueError(f"api must be grpc or http, got {api!r}")
    session_cls = _GrpcSession if api == "grpc" else _HttpSession
    answers: list[str | None] = [None] * len(requests)
    latencies: list[float | None] = [None] * len(requests)
    errors: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(clients)

    def client_loop(k: int) -> None:
        session = session_cls(address, auth_token, timeout_s)
        try:
            start.wait(timeout_s)
            for i in range(k, len(requests), clients):
                t0 = time.perf_counter()
                try:
                    answers[i] = session.answer(requests[i])
                    latencies[i] = time.perf_counter() - t0
                except session.error as exc:
                    with lock:
                        errors.append(f"request {i}: {type(exc).__name__}: {exc}")
        finally:
            session.close()

    threads = [threading.Thread(target=client_loop, args=(k,), name=f"load-client-{k}") for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s * (len(requests) // clients + 2))
    wall = time.perf_counter() - t0
    hung = [t.name for t in threads if t.is_alive()]
    if hung:
        errors.append(f"clients still waiting after their deadlines: {', '.join(hung)}")
    return RoundResult(answers, [x for x in latencies if x is not None], sorted(errors), wall)
