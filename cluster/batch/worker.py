"""Runs batch jobs from the BatchStore through a GenerationBackend, at most `concurrency` at a time.

On start it requeues every lease held under its own `owner` name (the work its previous incarnation had claimed
when it died) and any expired lease; while running it renews its leases and requeues expired ones, so a worker
that disappears without a restart is covered by the others within one lease period.
Bad input (InvalidRequest) fails a job at once; other errors are retried up to the store's `max_attempts`.
Each job attempt counts in the request metrics like an API call (pdllm_request_seconds by outcome), and the store's
jobs per state are published as pdllm_batch_jobs at every upkeep and after each job.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

from pdllm.cluster.api.backend import GenerationBackend
from pdllm.cluster.api.params import CheckedParams
from pdllm.cluster.batch.store import BatchStore
from pdllm.cluster.router.faults import one_line

from pdllm.errors import InvalidRequest
from pdllm.observability import metrics

log = logging.getLogger(__name__)


class BatchWorker:
    def __init__(
        self,
        store: BatchStore,
        backend: GenerationBackend,
        owner: str,
        concurrency: int = 1,
        lease_s: float = 30.0,
        poll_s: float = 0.2,
        job_timeout_s: float = 600.0,
    ) -> None:
        self.store, self.backend, self.owner = store, backend, owner
        self.concurrency, self.lease_s, self.poll_s, self.job_timeout_s = concurrency, lease_s, poll_s, job_timeout_s
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix=f"pdllm-batch-{owner}")
        self._active: dict[str, Future] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.recovered = 0
        self.finished = 0

    def start(self) -> BatchWorker:
        self.recovered = self.store.requeue(self.owner)
        if self.recovered:
            log.info("batch worker %s requeued %d job(s) left from before its restart", self.owner, self.recovered)
        self._thread = threading.Thread(target=self._loop, name=f"pdllm-batch-loop-{self.owner}", daemon=True)
        self._thread.start()
        return self

    def stop(self, wait: bool = True, timeout: float = 30.0) -> None:
        """Stop claiming; with `wait`, let running jobs finish (their leases are otherwise requeued later)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._pool.shutdown(wait=wait, cancel_futures=True)

    def _loop(self) -> None:
        last_upkeep = 0.0
        while not self._stop.is_set():
            try:
                now = time.monotonic()
                if now - last_upkeep > self.lease_s / 3:
                    with self._lock:
                        held = list(self._active)
                    self.store.renew(self.owner, held, self.lease_s)
                    self.store.requeue()
                    self.publish()
                    last_upkeep = now
                if not self._claim_one():
                    self._stop.wait(self.poll_s)
            except Exception:  # Redis briefly unreachable: keep trying, leases protect the jobs
                log.exception("batch worker %s: loop error", self.owner)
                self._stop.wait(1.0)

    def _claim_one(self) -> bool:
        with self._lock:
            if len(self._active) >= self.concurrency:
                return False
        got = self.store.claim(self.owner, self.lease_s)
        if got is None:
            return False
        m, spec, attempt = got
        with self._lock:
            self._active[m] = self._pool.submit(self._run, m, spec, attempt)
        return True

    def publish(self) -> None:
        """The store's jobs per state into pdllm_batch_jobs (a Redis hiccup leaves the last values)."""
        try:
            metrics.set_batch_jobs(self.store.state_counts())
        except Exception as exc:
            log.warning("batch worker %s: cannot read job counts: %s", self.owner, exc)

    def _run(self, m: str, spec: dict, attempt: int) -> None:
        start, outcome = time.monotonic(), "error"
        try:
            context = spec["context"] if "context" in spec else self.store.document(spec["document_ref"])
            request_id = f"batch:{m}:{attempt}"
            result = self.backend.generate(
                context,
                spec["question"],
                _params(spec),
                request_id,
                None,
                self.job_timeout_s,
            )
            outcome = "ok"
            if not self.store.complete(m, {"answer": result["answer"], "stats": result.get("stats", {})}):
                log.warning("batch job %s already had a result or was cancelled: this answer is dropped", m)
            self.finished += 1
        except InvalidRequest as exc:
            self.store.fail(m, self.owner, str(exc), retry=False)
        except Exception as exc:  # the job's error is one line; the whole report goes to the log
            log.warning("batch job %s attempt %d failed: %s", m, attempt, exc)
            self.store.fail(m, self.owner, one_line(exc), retry=True)
        finally:
            metrics.observe_request(time.monotonic() - start, None, outcome)
            with self._lock:
                self._active.pop(m, None)
            self.publish()

    def snapshot(self) -> dict:
        with self._lock:
            active = len(self._active)
        return {"owner": self.owner, "active": active, "finished": self.finished, "recovered": self.recovered}


def _params(spec: dict) -> dict:
    """A job's parameters as the backend takes them: those checked at submission against the server's limits
    (`jobs_from_request`) are not checked again; jobs stored by other means are, by the backend."""
    return CheckedParams(spec["params"]) if spec.get("checked") else spec["params"]
