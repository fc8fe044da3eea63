"""Chunk ranking for every job that asks at once, in one question forward.

Ranking a job's chunks needs a forward over its question (pdllm.method.selection.question_vectors). Run one job at
a time under the engine's GPU lock, eight jobs arriving together wait for eight forwards in a row, each between two
denoising steps. Here a job that asks joins the pending list and then takes the GPU lock; whichever job gets the
lock first ranks every pending job in one padded forward (up to `max_batch`) and hands each its result before
letting go, so the others find theirs done. No thread of its own, no waiting on a timer.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch
from torch import Tensor

from pdllm.errors import InvalidRequest
from pdllm.method.selection import check_top_k, question_vectors, scores_from, stack_summaries, top_chunks


@dataclass
class _Ask:
    question_ids: list[int]
    summaries: Tensor  # [N, L, Hkv, D] on the device
    top_k: int
    picked: list[int] | None = None
    error: BaseException | None = None
    done: bool = field(default=False)


class BatchedRanker:
    def __init__(self, lm, gpu_lock: threading.RLock, max_batch: int = 32) -> None:
        self.lm, self.gpu_lock, self.max_batch = lm, gpu_lock, max_batch
        self._pending: list[_Ask] = []
        self._lock = threading.Condition()  # the pending list; notified when it grows
        self.forwards = 0  # question forwards run
        self.ranked = 0  # jobs ranked by them

    def rank(self, question_ids: list[int], summaries: list[Tensor], top_k: int) -> list[int]:
        """Indices of the top-K chunks in document order, as selection.rank_chunks gives them."""
        check_top_k(top_k)
        if not question_ids:
            raise InvalidRequest("question is empty")
        if not summaries:
            return []
        ask = _Ask(list(question_ids), stack_summaries(self.lm, summaries, self.lm.model.device), top_k)
        with self._lock:
            self._pending.append(ask)
            self._lock.notify_all()
        while not ask.done:
            with self.gpu_lock:
                with self._lock:
                    batch = self._pending[: self.max_batch]
                    del self._pending[: len(batch)]
                if batch:
                    self._run(batch)
        if ask.error is not None:
            raise ask.error
        return ask.picked

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
        except BaseException as e:  # the GPU failed them all; each caller raises it
            for a in batch:
                a.error = e
        finally:
            for a in batch:
                a.done = True

    def wait_for_pending(self, n: int, timeout_s: float) -> bool:
        """Whether `n` jobs are waiting to be ranked within `timeout_s` (to observe a batch forming)."""
        with self._lock:
            return self._lock.wait_for(lambda: len(self._pending) >= n, timeout_s)

    def status(self) -> dict:
        return {"rank_forwards": self.forwards, "ranked_jobs": self.ranked}
