"""The Ray cluster behind the gRPC API: `ClusterBackend` adapts the router to `GenerationBackend`.

`pdllm serve --config FILE` builds it with `ClusterBackend.from_config(FILE)`, which starts the cluster (or joins
Ray) as the file says; `close()` stops what it started. A request runs in the caller's thread (the API server's
admission control bounds how many run at once); the router streams prefill and per-step events back through
`on_event`, stops at the request's deadline, and cancels the decode job when `on_event` raises (caller gone).
Parameters arrive as the API's plain dict (`cluster/api/params.py`); the cluster's own chunking and selection
settings are the defaults, so a request that sets none is served the way the config says.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from pdllm.cluster.api.backend import EventSink, method_kwargs
from pdllm.cluster.api.params import ApiLimits, checked_params, sampler_from_params
from pdllm.cluster.common.errors import RequestExpired
from pdllm.cluster.common.limits import ClusterLimits
from pdllm.cluster.config import ClusterConfig
from pdllm.cluster.runtime import ClusterHandle, start_cluster

from pdllm.models.generation_defaults import generation_defaults
from pdllm.observability import metrics

log = logging.getLogger(__name__)
MODES = ("sparse",)  # the cluster serves predictive prefilling; the baselines run in-process only
SNAPSHOT_TTL_S = 1.0  # actor metrics gathered for one scrape serve the next ones within this time


class ClusterBackend:
    def __init__(self, handle: ClusterHandle, name: str | None = None) -> None:
        self.handle, self.router = handle, handle.router
        cfg = handle.config
        self.name = name or Path(cfg.model_dir).name
        self.defaults = {"mode": MODES[0], "chunk_size": cfg.chunk_size, "chunking": cfg.chunking, "top_k": cfg.top_k}
        self.defaults.update(keep_ratio=cfg.keep_ratio, keep_question_kv=cfg.keep_question_kv)
        self.defaults.update(generation_defaults(cfg.model_dir))  # how the model decodes a request that does not say
        self._closed = False
        self._lock = threading.Lock()
        self._snapshots: tuple[float, list] = (0.0, [])
        metrics.add_remote_source(self._actor_metrics)

    @classmethod
    def from_config(cls, path: str | Path, limits: ClusterLimits | None = None) -> ClusterBackend:
        """Start the cluster the YAML file at `path` describes (see deploy/config.example.yaml); `limits` in place of
        the file's `limits:` (tests)."""
        return cls(start_cluster(ClusterConfig.from_yaml(path), limits))

    def generate(
        self,
        context: str,
        question: str,
        params: dict,
        request_id: str,
        on_event: EventSink | None = None,
        timeout_s: float | None = None,
    ) -> dict:
        params = checked_params(params, MODES, ApiLimits().for_model(self.router.max_position), self.defaults)
        method = method_kwargs(self.router.generate, params)["method"]
        sampler = sampler_from_params(params)
        try:
            out = self.router.generate(
                context,
                question,
                method,
                sampler,
                request_id,
                params["seed"],
                on_event=on_event,
                timeout_s=timeout_s,
                instruction=params.get("instruction", ""),
            )
        except RequestExpired as exc:  # the taxonomy's DeadlineExceeded already: say which request and deadline
            raise RequestExpired(f"request {request_id} ran past its deadline ({timeout_s}s): {exc}") from None
        return {"answer": out["answer"], "stats": {"mode": params["mode"], **out["stats"]}}

    def model_info(self) -> dict:
        model = self.handle.model
        return {
            "name": self.name,
            "model_id": self.router.model_id,
            "family": model.get("family", ""),
            "modes": list(MODES),
            "max_context_tokens": self.router.max_context_tokens,
            "max_length": self.router.max_position,
            "vocab_size": model.get("vocab_size"),
            "num_layers": model.get("num_layers"),
            "hidden_size": model.get("hidden_size"),
            "backend": "ray-cluster",
            "defaults": dict(self.defaults),
            "prefill_actors": len(self.router.prefill),
            "decode_actors": len(self.router.decode),
        }

    def _status(self) -> dict:
        status = self.router.status()
        snaps = [a.pop("metrics") for a in status["actors"] if isinstance(a.get("metrics"), dict)]
        with self._lock:
            self._snapshots = (time.monotonic(), snaps)
        return status

    def _actor_metrics(self) -> list:
        """The actors' metric snapshots for a /metrics scrape (gathered at most once per SNAPSHOT_TTL_S)."""
        if self._closed:
            return []
        with self._lock:
            at, snaps = self._snapshots
        if time.monotonic() - at > SNAPSHOT_TTL_S:
            self._status()
            with self._lock:
                snaps = self._snapshots[1]
        return snaps

    def health(self) -> dict:
        """The router's status (actors, stores, index, queues, fault counters) and whether requests can be served:
        at least one prefill and one decode actor alive."""
        if self._closed:
            return {"serving": False, "backend": "ray-cluster", "reason": "closed"}
        status = self._status()
        alive = {k: sum(1 for a in status["actors"] if a["kind"] == k and a["alive"]) for k in ("prefill", "decode")}
        return {
            "serving": alive["prefill"] > 0 and alive["decode"] > 0,
            "backend": "ray-cluster",
            "model": self.name,
            "alive": alive,
            **status,
        }

    def close(self) -> None:
        """Stop the actors, and Ray and the embedded Redis if this backend started them."""
        if self._closed:
            return
        self._closed = True
        self.handle.shutdown()

    shutdown = close

    def __enter__(self) -> ClusterBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
