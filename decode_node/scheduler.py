"""Step-level continuous batching: at every step boundary admit waiting jobs, drop cancelled and expired ones, run
one batched step over every running job, unmask per job, retire finished blocks and jobs, report each job's step.

Rows of the batch are kept dense (jobs 0..n-1): a retiring job's row is taken by the last job. The host learns each
step's outcome in one small copy (the block tokens and how many stay masked, for every job), which is all it needs
to advance blocks and to stream progress; every per-job decision on the device is batched (a few launches a step,
whatever the batch size), except sampling with a temperature or random remasking, which draws from the job's own
generator so that its answer does not depend on what it was batched with.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

import torch
from pdllm.decode_node.job import DecodeJob, JobCancelled, JobExpired, JobHandle, JobResult, JobState
from pdllm.decode_node.kv_pool import TRASH_PAGE, KVPool, PoolFull
from pdllm.decode_node.runner import BatchBuffers, StepRunner
from torch import Tensor

from pdllm.errors import InvalidRequest
from pdllm.models.spec import ModelSpec
from pdllm.sampler import add_gumbel_noise, topk_mask

log = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, spec: ModelSpec, pool: KVPool, buf: BatchBuffers, runner: StepRunner, clock=time.monotonic):
        self.spec, self.pool, self.buf, self.runner, self.clock = spec, pool, buf, runner, clock
        self.device = buf.ids.device
        self.waiting: deque[JobHandle] = deque()
        self.running: list[JobState] = []
        self.lock = threading.Condition()
        self.gpu_lock = threading.RLock()  # a step, or a submitter's own forward (ranking, selection), at a time
        self.total_steps = 0
        self.batched_jobs = 0  # sum over steps of the jobs in the step
        self.max_batch_seen = 0
        self.finished = 0

    # ---- submission ---------------------------------------------------------------------------------------------

    def submit(self, job: DecodeJob) -> JobHandle:
        self.check(job)
        handle = JobHandle(job)
        with self.lock:
            self.waiting.append(handle)
            self.lock.notify_all()
        return handle

    def check(self, job: DecodeJob) -> None:
        """Reject what the buffers cannot hold, naming the limit (the caller still holds its pins)."""
        s, buf = job.sampler, self.buf
        s.validate()
        if not job.question_ids:
            raise InvalidRequest("question is empty")
        span = len(job.question_ids) + s.gen_length
        if span > buf.max_span:
            raise InvalidRequest(f"question ({len(job.question_ids)} tokens) + gen_length exceeds {buf.max_span}")
        if s.block_length > buf.max_block:
            raise InvalidRequest(f"block_length {s.block_length} exceeds the decode engine's {buf.max_block}")
        extra = len(job.question_ids) if job.keep_question_kv else 0
        if job.sel_rows.shape[-1] + extra > buf.max_selected:
            raise InvalidRequest(
                f"{job.sel_rows.shape[-1]} selected context rows (+ {extra} kept question rows) exceed the decode "
                f"engine's {buf.max_selected}"
            )
        spec = self.spec
        if tuple(job.sel_rows.shape[:2]) != (spec.num_layers, spec.num_kv_heads):
            raise InvalidRequest(f"selected rows of shape {tuple(job.sel_rows.shape)} are not for this model")
        if job.start + span > spec.max_position and spec.max_position:
            raise InvalidRequest(
                f"positions up to {job.start + span} exceed the model's maximum length {spec.max_position}"
            )

    def has_work(self) -> bool:
        with self.lock:
            return bool(self.waiting or self.running)

    def wait_for_work(self, timeout_s: float, also: Callable[[], bool] = lambda: False) -> None:
        """Until a job waits or runs, `also()` holds (other work for the engine's thread), or `timeout_s`."""
        with self.lock:
            self.lock.wait_for(lambda: bool(self.waiting or self.running) or also(), timeout_s)

    def wake(self) -> None:
        """Wake the engine's thread (work arrived, or it should stop)."""
        with self.lock:
            self.lock.notify_all()

    # ---- one iteration ------------------------------------------------------------------------------------------

    def step(self) -> int:
        """Admit, drop, run one batched step and retire; returns the jobs that ran in it."""
        with self.gpu_lock:
            self._drop_stopped()
            self._admit()
            if not self.running:
                return 0
            n = len(self.running)
            t0 = time.perf_counter()
            try:
                outcome = self._run_step()
            except Exception as e:  # a failed step fails the jobs in it (named), never the engine thread
                log.exception("decode step over %d jobs failed", n)
                for state in list(self.running):
                    self._retire(state, error=e)
                return n
            dt = time.perf_counter() - t0
            self.total_steps += 1
            self.batched_jobs += n
            self.max_batch_seen = max(self.max_batch_seen, n)
            for state, (tokens, left) in zip(list(self.running), outcome, strict=True):
                state.step_seconds += dt
                state.batch_sizes += n
                done = state.advance(tokens, left)
                if state.job.keep_question_kv and state.kept_rows is None:
                    self._keep_question(state)
                try:
                    if state.job.on_step is not None:
                        state.job.on_step(state.steps, state.gen[None])
                except BaseException as e:  # the caller's callback stops its job (cancel, stream gone)
                    self._retire(state, error=e)
                    continue
                if done:
                    self._retire(state)
                elif state.step_in_block == 0:  # a new block: its rows
                    self._write_block_rows(state)
            return n

    def _run_step(self) -> list[tuple[list[int], int]]:
        buf, jobs = self.buf, self.running
        n = len(jobs)
        span = max(s.span_length for s in jobs)
        block = max(s.job.sampler.block_length for s in jobs)
        selected = int(max(self._selected(s) for s in jobs))
        writes = sum(s.q_live - (1 if s.shift else 0) for s in jobs if s.job.keep_question_kv and s.kept_rows is None)
        shape = self.runner.shape(n, span, block, selected, writes)
        self._write_writes(shape.writes)
        logits, chosen, conf = self.runner.forward(shape)
        logits, chosen, conf = logits[:n, :block], chosen[:n, :block], conf[:n, :block]
        for state in jobs:  # sampling from the job's own generator: batch-independent draws
            if state.generator is not None:
                chosen[state.row], conf[state.row] = self._sample(state, logits[state.row])
        tok_rows = buf.tok_rows[:n, :block]
        cur = buf.ids[:n].gather(1, tok_rows)
        valid = tok_rows < buf.max_span
        masked = (cur == self.spec.mask_token_id) & valid
        conf = torch.where(masked, conf, torch.full_like(conf, -1.0))
        counts = torch.tensor([s.step_count() for s in jobs], dtype=torch.long).to(self.device, non_blocking=True)
        thresholds = [s.job.sampler.threshold for s in jobs]
        thr = torch.tensor([2.0 if t is None else t for t in thresholds], dtype=conf.dtype).to(self.device)
        take = topk_mask(conf, counts.minimum(masked.sum(-1))) | ((conf >= thr[:, None]) & masked)
        new = torch.where(take, chosen, cur)
        buf.ids[:n].scatter_(1, tok_rows, new)
        left = (masked & ~take).sum(-1)
        host = torch.cat([new, left[:, None]], dim=1).cpu()  # the step's one wait on the device
        out = []
        for state in jobs:
            r = state.job.sampler.block_length
            out.append((host[state.row, :r].tolist(), int(host[state.row, block])))
        return out

    def _sample(self, state: JobState, logits: Tensor) -> tuple[Tensor, Tensor]:
        s = state.job.sampler
        r = s.block_length
        row = logits[:r]
        chosen = add_gumbel_noise(row, s.temperature, state.generator).argmax(-1)
        if s.remasking == "low_confidence":
            conf = torch.softmax(row.float(), dim=-1).gather(-1, chosen[..., None]).squeeze(-1)
        else:
            conf = torch.rand(chosen.shape, generator=state.generator, device=row.device)
        pad = logits.shape[0] - r
        if pad:
            chosen = torch.cat([chosen, torch.zeros(pad, dtype=chosen.dtype, device=chosen.device)])
            conf = torch.cat([conf, torch.zeros(pad, dtype=conf.dtype, device=conf.device)])
        return chosen, conf.to(torch.float32)

    # ---- admission and retirement -------------------------------------------------------------------------------

    def _admit(self) -> None:
        while True:
            with self.lock:
                if not self.waiting or len(self.running) >= self.buf.max_batch:
                    return
                handle = self.waiting[0]
                if handle.cancelled or self._expired(handle.job):
                    self.waiting.popleft()
                    self._finish_unadmitted(handle)
                    continue
            state = JobState(
                handle, self.spec.mask_token_id, self.spec.eos_token_ids, self.spec.shift_logits, self.device
            )
            if handle.job.keep_question_kv:
                try:
                    rows = len(handle.job.question_ids) - (1 if state.shift else 0)
                    state.private_pages, state.kept_rows_planned = self.pool.alloc_rows(max(rows, 1))
                except PoolFull as exc:
                    if self.running:
                        return  # waits at the head of the queue until a running job frees pages
                    with self.lock:  # nothing runs that could free pages: waiting would only block the queue
                        self.waiting.popleft()
                    self._finish_unadmitted(
                        handle, PoolFull(f"job {handle.job.job_id}: no room for its kept question KV ({exc})")
                    )
                    continue
            with self.lock:
                self.waiting.popleft()
            state.admitted = time.perf_counter()
            state.row = len(self.running)
            self.running.append(state)
            self._write_row(state)

    def _drop_stopped(self) -> None:
        for state in list(self.running):
            if state.handle.cancelled:
                self._retire(state, error=JobCancelled(f"job {state.job.job_id} cancelled at step {state.steps}"))
            elif self._expired(state.job):
                self._retire(
                    state, error=JobExpired(f"job {state.job.job_id} passed its deadline at step {state.steps}")
                )

    def _expired(self, job: DecodeJob) -> bool:
        return job.deadline is not None and self.clock() >= job.deadline

    def _finish_unadmitted(self, handle: JobHandle, err: BaseException | None = None) -> None:
        job = handle.job
        if err is None and handle.cancelled:
            err = JobCancelled(f"job {job.job_id} cancelled before it started")
        err = err or JobExpired(f"job {job.job_id} passed its deadline while queued")
        self._release(job)
        handle.finish(None, err)

    def _retire(self, state: JobState, error: BaseException | None = None) -> None:
        row = state.row
        last = self.running.pop()
        if last is not state:  # the last job takes the freed row: rows stay dense
            self.running[row] = last
            last.row = row
            self._copy_row(row_to=row, row_from=len(self.running), selected=self._selected(last))
        self._clear_row(len(self.running))
        if state.private_pages:
            self.pool.free_pages(state.private_pages)
        self._release(state.job)
        self.finished += 1
        if error is not None:
            state.handle.finish(None, error)
            return
        n = state.steps
        stats = {
            "steps": n,
            "decode_seconds": round(state.step_seconds, 4),
            "mean_step_ms": round(1000 * state.step_seconds / max(n, 1), 3),
            "mean_batch": round(state.batch_sizes / max(n, 1), 2),
            "queue_seconds": round(state.admitted - state.submitted, 4),
            "first_block_seconds": round(state.first_block_s or 0.0, 4),
            "keep_question_kv": state.job.keep_question_kv,
        }
        state.handle.finish(JobResult(tokens=state.gen[: state.end].tolist(), steps=n, stats=stats))

    @staticmethod
    def _release(job: DecodeJob) -> None:
        if job.release is not None:
            job.release()
            job.release = None

    # ---- buffer rows --------------------------------------------------------------------------------------------

    def _selected(self, state: JobState) -> int:
        n = state.job.sel_rows.shape[-1]
        return n + (state.kept_rows.numel() if state.kept_rows is not None else 0)

    def _write_row(self, state: JobState) -> None:
        """Everything row `state.row` holds: span tokens, positions, selected rows, block rows."""
        buf, b, job = self.buf, state.row, state.job
        q = job.question_ids[len(job.question_ids) - state.q_live :]
        span = torch.tensor(q + state.gen.tolist(), dtype=torch.long)
        t = span.numel()
        first = job.start + len(job.question_ids) - state.q_live
        buf.ids[b, :t] = span.to(self.device)
        buf.pos[b, :t] = torch.arange(first, first + t, device=self.device)
        buf.self_len[b] = t
        rows = job.sel_rows
        if state.kept_rows is not None:
            kept = state.kept_rows.to(rows.device)[None, None].expand(rows.shape[0], rows.shape[1], -1)
            rows = torch.cat([rows, kept], dim=-1)
        buf.sel[:, b, :, : rows.shape[-1]] = rows.to(self.device)
        buf.sel_len[b] = rows.shape[-1]
        self._write_block_rows(state)

    def _write_block_rows(self, state: JobState) -> None:
        buf, b = self.buf, state.row
        lo, hi = state.block_range
        shift = 1 if state.shift else 0
        tok = torch.arange(state.q_live + lo, state.q_live + hi, device=self.device)
        buf.tok_rows[b] = buf.max_span
        buf.tok_rows[b, : hi - lo] = tok
        buf.logit_rows[b] = 0
        buf.logit_rows[b, : hi - lo] = tok - shift

    def _keep_question(self, state: JobState) -> None:
        """After the job's first step its question's KV is in its pages: from now on only the block (and, with
        shifted logits, the question's last token) runs, attending to the kept rows."""
        shift = 1 if state.shift else 0
        kept = len(state.job.question_ids) - shift
        state.kept_rows = state.kept_rows_planned[:kept] if kept > 0 else state.kept_rows_planned[:0]
        state.q_live = shift
        if not state.finished:
            self._write_row(state)

    def _write_writes(self, writes: int) -> None:
        """The write list of this step: the question rows of jobs on their first step with kept question KV."""
        if writes == 0:
            return
        bs, ts, rows = [], [], []
        for s in self.running:
            if s.job.keep_question_kv and s.kept_rows is None:
                n = s.q_live - (1 if s.shift else 0)
                bs += [s.row] * n
                ts += list(range(n))
                rows.append(s.kept_rows_planned[:n].cpu().long())
        flat = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)
        w, pr = flat.numel(), self.pool.page_rows
        buf = self.buf
        buf.write_b[:w] = torch.tensor(bs, dtype=torch.long, device=self.device)
        buf.write_t[:w] = torch.tensor(ts, dtype=torch.long, device=self.device)
        buf.write_page[:w] = (flat // pr).to(self.device)
        buf.write_row[:w] = (flat % pr).to(self.device)
        buf.write_page[w:writes] = TRASH_PAGE
        buf.write_row[w:writes] = 0
        buf.write_b[w:writes] = 0
        buf.write_t[w:writes] = 0

    def _copy_row(self, row_to: int, row_from: int, selected: int) -> None:
        buf = self.buf
        for t in (buf.ids, buf.pos, buf.self_len, buf.sel_len, buf.logit_rows, buf.tok_rows):
            t[row_to] = t[row_from]
        buf.sel[:, row_to, :, :selected] = buf.sel[:, row_from, :, :selected]

    def _clear_row(self, row: int) -> None:
        buf = self.buf
        buf.self_len[row] = 0
        buf.sel_len[row] = 0
        buf.tok_rows[row] = buf.max_span
        buf.logit_rows[row] = 0
