"""What the API server and the batch worker need from whatever generates answers.

The server never imports Ray: the cluster router is adapted to `GenerationBackend` (a thin `ClusterBackend`), and
`pdllm.cluster.api.in_process.InProcessBackend` runs `pdllm.engine.generate` on a loaded model in this process
(single-machine mode and tests).

Events passed to `on_event` (plain dicts, the `type` key says which):
  {"type": "prefill", "done_chunks", "total_chunks", "reused_chunks", "context_tokens"}
  {"type": "step", "step", "total_steps", "partial_text", "unmasked_tokens"}
`on_event` may raise (e.g. `pdllm.errors.Cancelled` when the caller went away): the backend stops and re-raises it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Protocol

from pdllm.method import MethodConfig

EventSink = Callable[[dict], None]


class GenerationBackend(Protocol):
    def generate(
        self,
        context: str,
        question: str,
        params: dict,
        request_id: str,
        on_event: EventSink | None = None,
        timeout_s: float | None = None,
    ) -> dict:
        """Answer `question` about `context`; returns {"answer": str, "stats": dict}. Raises InvalidRequest for bad
        input, DeadlineExceeded after `timeout_s`, and whatever `on_event` raised."""
        ...

    def model_info(self) -> dict:
        """{"name", "model_id", "family", "modes", "max_context_tokens", ...}"""
        ...

    def health(self) -> dict:
        """{"serving": bool, ...}"""
        ...


def method_kwargs(generate: Callable, params: dict) -> dict:
    """Chunking and selection parameters for an engine whose `generate` takes a `method` (prefix/sparse modes)."""
    if "method" not in inspect.signature(generate).parameters:
        return {}
    method = MethodConfig(
        chunk_size=params["chunk_size"],
        chunking=params.get("chunking", "text"),
        top_k=params["top_k"],
        keep_ratio=params["keep_ratio"],
        scoring=params.get("scoring", "summary"),
        selected_kv=params.get("selected_kv", "reuse"),
        keep_question_kv=bool(params.get("keep_question_kv", False)),
    )
    return {"method": method}
