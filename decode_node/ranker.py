"""Chunk ranking for every job that asks at once, in one question forward, on the engine's thread.

Ranking a job's chunks needs a forward over its question (pdllm.method.selection.question_vectors). Run by each
job's own thread under the engine's GPU lock, jobs arriving together wait for one forward after another, and a
busy engine, which takes the lock again the moment a step ends, keeps them waiting for many steps. Here a job's
ask joins a pending list and wakes the engine; between two steps the engine ranks every pending ask in one padded
forward (up to `max_batch`) and each asker wakes to its result. Asks go before the next step, so their jobs can
join it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from pdllm.errors import InvalidRequest, PdllmError
from pdllm.method.selection import check_top_k, question_vectors, scores_from, stack_summaries, top_chunks


class RankTimeout(PdllmError):
    """The engine did not rank a job's chunks in time."""


@dataclass
class _Ask:
    question_ids: list[int]
    summaries: Tensor  # [N, L, Hkv, D] on the device
    top_k: int
    picked: list[int] | None = None
    error: BaseException | None = None
    done: bool = False


class BatchedRanker:
    def __init__(self, lm, gpu_lock: threading.RLock, wake: Callable[[], None], max_batch: int = 32) -> None:
        """`wake()` tells the engine's thread that asks are pending (it then calls `run_pending`)."""
        self.lm, self.gpu_lock, self.wake, self.max_batch = lm, gpu_lock, wake, max_batch
        self._pending: list[_Ask] = []
        self._lock = threading.Condition()  # the pending list and every ask's `done`
        self.forwards = 0  # question forwards run
        self.ranked = 0  # asks ranked by them

    def rank(self, question_ids: list[int], summaries: list[Tensor], top_k: int, timeout_s: float = 300.0) -> list[int]:
        """Indices of the top-K chunks in document order, as selection.rank_chunks gives them."""
        check_top_k(top_k)
        if not question_ids:
            raise InvalidRequest("question is empty")
        if not summaries:
            return []
        ask = _Ask(list(question_ids), stack_summaries(self.lm, summaries, self.lm.model.device), top_k)
        with self._lock:
            self._pending.append(ask)
        self.wake()
        with self._lock:
            if not self._lock.wait_for(lambda: ask.done, timeout_s):
                if ask in self._pending:
                    self._pending.remove(ask)
                raise RankTimeout(f"chunk ranking was not done within {timeout_s:.0f}s (is the decode engine running?)")
        if ask.error is not None:
            raise ask.error
        return ask.picked

    def has_pending(self) -> bool:
        with self._lock:
            return bool(self._pending)

    def run_pending(self) -> int:
        """Rank the pending asks (up to max_batch) in one forward; returns how many. Called by the engine's thread."""
        with self.gpu_lock:
            with self._lock:
                batch = self._pending[: self.max_batch]
                del self._pending[: len(batch)]
            if batch:
                self._run(batch)
        return len(batch)

    def fail_pending(self, error: BaseException) -> None:
        """End every pending ask with `error` (the engine is shutting down)."""
        with self._lock:
            for a in self._pending:
                a.error, a.done = error, True
            self._pending.clear()
            self._lock.notify_all()

    def _run(self, batch: list[_Ask]) -> None:
        """Rank `batch` in one forward; every ask ends done, with its result or the error that stopped it."""
        try:
            vectors = question_vectors(self.lm, [a.question_ids for a in batch])
            scores = [scores_from(v, a.summaries) for v, a in zip(vectors, batch, strict=True)]
            on_host = torch.cat(scores).cpu().split([len(s) for s in scores])  # one device-to-host copy
            for a, s in zip(batch, on_host, strict=True):
                a.picked = top_chunks(s, a.top_k)
            self.forwards += 1
            self.ranked += len(batch)
        except Exception as e:  # the forward failed for all of them; each asker raises it
            for a in batch:
                a.error = e
        finally:
            with self._lock:
                for a in batch:
                    a.done = True
                self._lock.notify_all()

    def wait_for_pending(self, n: int, timeout_s: float) -> bool:
        """Whether `n` asks are waiting within `timeout_s` (to observe a batch forming)."""
        with self._lock:
            return self._lock.wait_for(lambda: len(self._pending) >= n, timeout_s)

    def status(self) -> dict:
        return {"rank_forwards": self.forwards, "ranked_jobs": self.ranked}
