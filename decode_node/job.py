"""One request's decode state: what it attends to, its generated tokens, its unmasking rule, where it stands.

A `DecodeJob` is what a submitter hands the engine (the question, the pool rows it reads, the sampler, the seed, the
callback, the deadline); the scheduler turns it into a `JobState` that advances block by block, step by step, with
the same decisions the single-request loop (`pdllm.sampler.denoise`) makes: LLaDA's fixed count per step or
Fast-dLLM's threshold, stopping after a block that produced an end token.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from pdllm.errors import PdllmError
from pdllm.sampler import SamplerConfig, tokens_per_step


class JobCancelled(PdllmError):
    """The job was cancelled (its caller left) before it finished."""


class JobExpired(PdllmError):
    """The job's deadline passed before it finished."""


@dataclass
class DecodeJob:
    job_id: str
    question_ids: list[int]
    sel_rows: Tensor  # [L, Hkv, N] int32 pool rows of the selected context, per layer and KV head
    start: int  # position of the first question token (the selected context sits before it)
    sampler: SamplerConfig
    keep_question_kv: bool = False
    seed: int = 0
    on_step: Callable[[int, Tensor], None] | None = None  # (step, generated tokens [1, G] on the host)
    deadline: float | None = None  # time.monotonic() after which the job is dropped
    release: Callable[[], None] | None = None  # called once when the job leaves the engine (unpins its chunks)


@dataclass
class JobResult:
    tokens: list[int]  # generated tokens, masks and end tokens included (truncated after the last block run)
    steps: int
    stats: dict = field(default_factory=dict)


class JobHandle:
    """The submitter's side of a job: wait for its result, or cancel it."""

    def __init__(self, job: DecodeJob) -> None:
        self.job = job
        self.done = threading.Event()
        self.cancelled = False
        self.result: JobResult | None = None
        self.error: BaseException | None = None

    def cancel(self) -> None:
        self.cancelled = True

    def finish(self, result: JobResult | None, error: BaseException | None = None) -> None:
        self.result, self.error = result, error
        self.done.set()

    def wait(self, timeout_s: float | None = None) -> JobResult:
        if not self.done.wait(timeout_s):
            raise TimeoutError(f"job {self.job.job_id} did not finish within {timeout_s}s")
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


class JobState:
    """Scheduler-side progress of one job (host memory only; the device copy of its span lives in the batch)."""

    def __init__(
        self, handle: JobHandle, mask_id: int, eos_ids: tuple[int, ...], shift: bool, device: torch.device
    ) -> None:
        job = handle.job
        s = job.sampler
        self.handle, self.job, self.mask_id, self.shift = handle, job, mask_id, shift
        self.stop_tokens = eos_ids
        self.gen = torch.full((s.gen_length,), mask_id, dtype=torch.long)
        self.blocks = s.gen_length // s.block_length
        self.steps_per_block = s.steps // self.blocks
        self.schedule = tokens_per_step(s.block_length, self.steps_per_block)
        self.block = 0
        self.step_in_block = 0
        self.steps = 0
        self.end = s.gen_length
        self.finished = False
        self.q_live = len(job.question_ids)  # question tokens run in the span (fewer once their KV is kept)
        self.kept_rows: Tensor | None = None  # pool rows of the kept question KV, once written
        self.kept_rows_planned: Tensor | None = None  # the rows allocated for it at admission
        self.private_pages: list[int] = []
        self.row = -1  # batch row
        self.generator = None
        if s.temperature > 0 or s.remasking == "random":
            self.generator = torch.Generator(device=device).manual_seed(job.seed)
        self.submitted = time.perf_counter()
        self.admitted = 0.0
        self.first_block_s: float | None = None
        self.step_seconds = 0.0
        self.batch_sizes = 0

    @property
    def block_range(self) -> tuple[int, int]:
        lo = self.block * self.job.sampler.block_length
        return lo, lo + self.job.sampler.block_length

    @property
    def span_length(self) -> int:
        return self.q_live + self.job.sampler.gen_length

    def step_count(self) -> int:
        """Tokens the LLaDA rule unmasks this step (the threshold rule unmasks at least one)."""
        if self.job.sampler.threshold is not None:
            return 1
        return self.schedule[min(self.step_in_block, len(self.schedule) - 1)]

    def advance(self, block_tokens: list[int], masked_left: int) -> bool:
        """Record one step's outcome for the current block; True when the job is finished."""
        lo, hi = self.block_range
        self.gen[lo:hi] = torch.tensor(block_tokens, dtype=torch.long)
        self.steps += 1
        self.step_in_block += 1
        s = self.job.sampler
        limit = self.steps_per_block if s.threshold is None else s.block_length
        if masked_left > 0 and self.step_in_block < limit:
            return False
        if self.first_block_s is None:
            self.first_block_s = time.perf_counter() - self.submitted
        eos = self.stop_tokens
        if s.stop_at_eos and eos and any(t in eos for t in block_tokens):
            self.end = hi
            self.finished = True
        elif self.block + 1 >= self.blocks:
            self.finished = True
        else:
            self.block += 1
            self.step_in_block = 0
        return self.finished
