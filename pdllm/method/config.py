"""The knobs of predictive prefilling, validated once so every caller (CLI, engine, actors) rejects the same input."""

from __future__ import annotations

from dataclasses import dataclass

from pdllm.errors import InvalidRequest

MIN_CHUNK_SIZE = 16


@dataclass(frozen=True)
class MethodConfig:
    chunk_size: int = 512  # context tokens per chunk (a BOS anchor is added in front of each)
    top_k: int = 8  # chunks kept per question; more than the document has is clamped (and reported)
    keep_ratio: float = 1.0  # fraction of each kept chunk's tokens kept per layer and KV head (BOS always kept)
    use_bos: bool = True  # the BOS anchor per chunk; off only for the ablation
    keep_question_kv: bool = False  # cache the question's KV after the first step (recompute only the block)

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
