"""The work the router hands the node actors and what they answer, typed: the router reads the index once, hashes
each chunk once, and passes what it learned down (chunk ids, index entries) instead of each actor finding it out
again. Ray pickles these between processes; both sides import this module, so a field added is seen by both."""

from __future__ import annotations

from dataclasses import dataclass, field

from pdllm.cluster.kv.chunk_index import IndexEntry

from pdllm.method import MethodConfig, chunk_id
from pdllm.sampler import SamplerConfig


@dataclass(frozen=True)
class PrefillJob:
    """Chunks the router found no index entry for: id (the router's hash) -> tokens, in document order."""

    chunks: dict[str, list[int]]
    method: MethodConfig
    request_id: str | None = None

    @classmethod
    def of(cls, model_id: str, chunks: list[list[int]], method: MethodConfig) -> PrefillJob:
        """A job for `chunks` as token lists, their ids computed here (callers without a router: tests, drills)."""
        return cls({chunk_id(model_id, c, method.chunk_size, method.use_bos): c for c in chunks}, method)


@dataclass
class PrefillResult:
    """`entries`: what the actor registered or found registered (held in its store, or indexed since the router
    looked); `waiting`: ids another actor has claimed and is encoding (the router waits for their entries)."""

    entries: dict[str, IndexEntry] = field(default_factory=dict)
    encoded: list[str] = field(default_factory=list)  # the ids among `entries` this call encoded
    waiting: list[str] = field(default_factory=list)
    indexed_elsewhere: list[str] = field(default_factory=list)  # registered by another actor since the router looked


@dataclass(frozen=True)
class DecodeTask:
    """One decode for a decode actor (the engine has its own `DecodeJob`): the question, the document's chunk ids
    in order, and the index entries of every one of them (read by the router or written by a prefill actor for this
    request), so the decode actor reads no index."""

    job_id: str
    request_id: str
    question_ids: list[int]
    chunk_ids: list[str]
    entries: dict[str, IndexEntry]
    method: MethodConfig
    sampler: SamplerConfig
    seed: int = 0
    instruction_ids: list[int] = field(default_factory=list)
    stream: bool = False  # send a StepEvent per denoising step
    total_steps: int = 0


@dataclass(frozen=True)
class StepEvent:
    """A denoising step done: the answer so far."""

    step: int
    total_steps: int
    partial_text: str
    unmasked_tokens: int

    def as_event(self) -> dict:
        """The backend interface's event (`pdllm.cluster.api.backend`)."""
        return {"type": "step", "step": self.step, "total_steps": self.total_steps,
                "partial_text": self.partial_text, "unmasked_tokens": self.unmasked_tokens}  # fmt: skip


@dataclass(frozen=True)
class DecodeResult:
    tokens: list[int]
    answer: str
    stats: dict


@dataclass(frozen=True)
class ChunksMissing:
    """Selected chunks could not be had: their ids, and per holder why ("missing", or the transfer failure); their
    index entries are dropped, so the router prefills them again."""

    missing: list[str]
    holders: dict[str, str]


@dataclass(frozen=True)
class StreamCancelled:
    """The stream's last item when the job was cancelled (caller gone, deadline)."""

    job_id: str
