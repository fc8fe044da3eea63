"""One family-neutral description of a dLLM, parsed from each family's own config.json fields.

The engine only ever reads a `ModelSpec`; the family modules (llada.py, dream.py) say how their config fields and
tensor names map onto it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class ModelSpec:
    family: str  # "llada" or "dream"
    vocab_size: int  # rows of the embedding / LM head (may exceed the tokenizer's vocabulary)
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rope_theta: float
    rms_norm_eps: float
    max_position: int
    mask_token_id: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    pad_token_id: int | None = None
    qkv_bias: bool = False
    tie_word_embeddings: bool = False
    shift_logits: bool = False  # Dream: the token at position i is predicted from position i-1

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """Bytes of K and V that one cached token costs across all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    def to_dict(self) -> dict:
        return asdict(self)
