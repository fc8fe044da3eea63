"""`GenerationBackend` on a model loaded in this process: `pdllm.engine.generate` in a pool of threads, every
thread's job batched into the decode engine's steps (single-machine mode, `pdllm serve` without a cluster, tests)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from pdllm.cluster.api.backend import EventSink, method_kwargs
from pdllm.cluster.api.params import ApiLimits, checked_params, sampler_from_params

from pdllm.engine import MODES, engine_for, generate, release_engine
from pdllm.errors import DeadlineExceeded
from pdllm.models.generation_defaults import generation_defaults
from pdllm.models.loader import load_model
from pdllm.prompt import encode_request
from pdllm.sampler import strip_after_eos


class _Stop(Exception):
    """Raised inside the denoising loop to abandon a request whose caller gave up."""


class InProcessBackend:
    """`engine.generate` on one loaded model, in a pool of `concurrency` threads (requests beyond wait in it)."""

    def __init__(
        self,
        lm,
        name: str | None = None,
        concurrency: int = 1,
        max_context_tokens: int = 131072,
        engine=None,
        owns_model: bool = False,
    ) -> None:
        """`engine`: the decode engine's EngineConfig (applies if this process has no engine for `lm` yet).
        `owns_model`: `lm` was loaded for this backend alone, so `close` frees its engine (pool included); a
        backend on a model others use leaves the model's engine to them."""
        self.lm, self.owns_model = lm, owns_model
        self.name = name or lm.path.name
        self.modes = tuple(MODES)
        self.max_context_tokens = max_context_tokens
        self.concurrency = concurrency
        self.engine = engine_for(lm, engine)  # every thread's job is batched into its steps
        self.defaults = generation_defaults(lm.path) if lm.path else {}  # decoding a request leaves unset
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="pdllm-generate")
        self._lock = threading.Lock()
        self._running = 0

    @classmethod
    def from_directory(cls, model_dir: str, device: str = "cpu", **kwargs) -> InProcessBackend:
        return cls(load_model(model_dir, device=device), owns_model=True, **kwargs)

    def generate(
        self,
        context: str,
        question: str,
        params: dict,
        request_id: str,
        on_event: EventSink | None = None,
        timeout_s: float | None = None,
    ) -> dict:
        params = checked_params(params, self.modes, ApiLimits().for_model(self.lm.spec.max_position), self.defaults)
        stop = threading.Event()
        future = self._pool.submit(self._run, context, question, params, on_event, stop)
        try:
            return future.result(timeout=timeout_s)
        except FutureTimeout:
            stop.set()
            raise DeadlineExceeded(f"request {request_id} ran past its deadline of {timeout_s:.3f}s") from None
        except _Stop:
            raise DeadlineExceeded(f"request {request_id} ran past its deadline") from None

    def _run(self, context: str, question: str, params: dict, on_event: EventSink | None, stop: threading.Event):
        if stop.is_set():
            raise _Stop()
        lm, spec = self.lm, self.lm.spec
        with self._lock:
            self._running += 1
        try:
            instruction = params.get("instruction", "")
            encoded = encode_request(lm.tokenizer, context, question, self.max_context_tokens, instruction)
            if on_event is not None:
                on_event(
                    {
                        "type": "prefill",
                        "done_chunks": 0,
                        "total_chunks": 0,
                        "reused_chunks": 0,
                        "context_tokens": len(encoded.context_ids),
                    }
                )
            total_steps = params["steps"] if params["threshold"] is None else params["gen_length"]

            def on_step(step: int, gen) -> None:
                if stop.is_set():
                    raise _Stop()
                if on_event is not None:
                    row = gen[0].tolist()
                    tokens = strip_after_eos(row, spec.eos_token_ids, spec.mask_token_id)
                    on_event(
                        {
                            "type": "step",
                            "step": step,
                            "total_steps": total_steps,
                            "partial_text": lm.tokenizer.decode(tokens),
                            "unmasked_tokens": sum(t != spec.mask_token_id for t in row),
                        }
                    )

            sampler = sampler_from_params(params)
            extra = method_kwargs(generate, params)
            if instruction:
                extra["instruction"] = instruction
            out = generate(
                lm,
                context,
                question,
                sampler,
                params["mode"],
                self.max_context_tokens,
                params["seed"],
                on_step,
                engine=self.engine,
                **extra,
            )
        finally:
            with self._lock:
                self._running -= 1
        stats = {"prefill_chunks": 0, "reused_chunks": 0, "selected_chunks": 0, **out.stats}
        return {"answer": out.answer, "stats": stats}

    def model_info(self) -> dict:
        spec = self.lm.spec
        return {
            "name": self.name,
            "model_id": self.lm.model_id,
            "family": spec.family,
            "modes": list(self.modes),
            "max_context_tokens": self.max_context_tokens,
            "max_length": spec.max_position,
            "vocab_size": spec.vocab_size,
            "num_layers": spec.num_layers,
            "hidden_size": spec.hidden_size,
            "concurrency": self.concurrency,
            "defaults": dict(self.defaults),
        }

    def health(self) -> dict:
        return {"serving": True, "backend": "in-process", "model": self.name, "running": self._running}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.owns_model:
            release_engine(self.lm)  # jobs still running end with EngineClosed
