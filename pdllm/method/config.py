"""The knobs of predictive prefilling, validated once so every caller (CLI, engine, actors) rejects the same input."""

from __future__ import annotations

from dataclasses import dataclass

from pdllm.errors import InvalidRequest

MIN_CHUNK_SIZE = 16
SCORINGS = ("summary", "draft")  # how chunks are ranked (selection.py: key summaries; draft_scoring.py: likelihood)
SELECTED_KVS = ("reuse", "joint")  # how the selected chunks are attended (decode.py: cached KV; joint.py: re-encoded)
CHUNKINGS = ("text", "fixed")  # where chunks end (chunks.split_chunks): at a text border near the size, or at it
MAX_DRAFT_TOKENS = 64


@dataclass(frozen=True)
class MethodConfig:
    chunk_size: int = 512  # context tokens per chunk, at most (a BOS anchor is added in front of each)
    chunking: str = "text"  # "text": end each chunk at a sentence, clause or word border in its last half; "fixed"
    top_k: int = 8  # chunks kept per question; more than the document has is clamped (and reported)
    keep_ratio: float = 1.0  # fraction of each kept chunk's tokens kept per layer and KV head (BOS always kept)
    use_bos: bool = True  # the BOS anchor per chunk; off only for the ablation
    keep_question_kv: bool = False  # cache the question's KV after the first step (recompute only the block)
    scoring: str = "summary"  # "draft": rank by the likelihood of question + drafted answer tokens given each chunk
    draft_tokens: int = 4  # answer tokens drafted without context for draft scoring
    draft_rounds: int = 1  # partial rounds after the first draft token: each confirms one more token
    selected_kv: str = "reuse"  # "joint": re-encode instruction + selected chunks + question together once

    def validate(self, max_position: int | None = None) -> None:
        """Raise InvalidRequest naming the first bad field; `max_position` is the model's trained length."""
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int):
            raise InvalidRequest(f"chunk_size must be an integer, got {self.chunk_size!r}")
        if self.chunk_size < MIN_CHUNK_SIZE:
            raise InvalidRequest(f"chunk_size must be >= {MIN_CHUNK_SIZE}, got {self.chunk_size}")
        if max_position is not None and self.chunk_size > max_position:
            raise InvalidRequest(f"chunk_size {self.chunk_size} exceeds the model's maximum length {max_position}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise InvalidRequest(f"top_k must be an integer >= 1, got {self.top_k!r}")
        if not isinstance(self.keep_ratio, (int, float)) or not 0.0 < self.keep_ratio <= 1.0:
            raise InvalidRequest(f"keep_ratio must be in (0, 1], got {self.keep_ratio!r}")
        if self.scoring not in SCORINGS:
            raise InvalidRequest(f"scoring must be one of {', '.join(SCORINGS)}, got {self.scoring!r}")
        if self.chunking not in CHUNKINGS:
            raise InvalidRequest(f"chunking must be one of {', '.join(CHUNKINGS)}, got {self.chunking!r}")
        if self.selected_kv not in SELECTED_KVS:
            raise InvalidRequest(f"selected_kv must be one of {', '.join(SELECTED_KVS)}, got {self.selected_kv!r}")
        for name in ("draft_tokens", "draft_rounds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_DRAFT_TOKENS:
                raise InvalidRequest(f"{name} must be an integer in [0, {MAX_DRAFT_TOKENS}], got {value!r}")
