"""Sparse decoding: denoise over question + generated block only, attending to the selected chunks' cached KV.

Positions: every chunk was encoded at chunk-local positions 0..S-1, so the selected chunks share one position
window (the paper's "reuse" layout); the question starts right after the longest selected chunk, at S_max, and
the block follows it. One chunk selected whole is therefore laid out exactly as the prefix cache lays out the same
context. The selected KV stays fixed; the question is recomputed at every step unless `keep_question_kv`, which
stores the question's KV from the first step in extra pool slots and then recomputes only the block (for
shifted-logit models also the question's last token, whose output predicts the block's first token).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from pdllm.errors import InvalidRequest
from pdllm.method.chunk_kv import ChunkKV
from pdllm.method.config import MethodConfig
from pdllm.method.pool import ChunkPool, SparseChunkAttention
from pdllm.method.selection import question_queries, select_tokens
from pdllm.models.transformer import DllmModel
from pdllm.sampler import SamplerConfig, denoise


@dataclass
class DecodeResult:
    tokens: list[int]  # generated tokens of the (single) request, masks and end tokens included
    steps: int
    stats: dict = field(default_factory=dict)


class SparseDenoiser:
    """One step: the span (question + block, or the block alone once the question's KV is kept) through the model
    with a SparseChunkAttention context."""

    def __init__(
        self, model: DllmModel, question: Tensor, start: int, context: SparseChunkAttention, keep_question_kv: bool
    ) -> None:
        self.model, self.question, self.start, self.context = model, question, start, context
        self.keep_question_kv = keep_question_kv
        self.shift = model.spec.shift_logits
        self.cached_rows = 0  # question tokens whose KV lives in the pool
        self.span_tokens: list[int] = []  # tokens run per step (for tests and stats)

    @torch.no_grad()
    def logits(self, gen: Tensor) -> Tensor:
        tq = self.question.shape[1]
        live = self.question[:, self.cached_rows :].expand(gen.shape[0], -1)
        x = torch.cat([live, gen], dim=1)
        first = self.start + self.cached_rows
        pos = torch.arange(first, first + x.shape[1], device=x.device).expand(x.shape[0], -1)
        p = live.shape[1]
        logits_from = p - 1 if self.shift else p
        store = self.keep_question_kv and self.cached_rows == 0
        out = self.model(x, position_ids=pos, context=self.context, return_kv=store, logits_from=logits_from)
        self.span_tokens.append(x.shape[1])
        if store:
            self.cache_question(out.kv, tq - 1 if self.shift else tq)
        return self.model.token_logits(out.logits, p - logits_from, gen.shape[1])

    def cache_question(self, kv: list[tuple[Tensor, Tensor]], count: int) -> None:
        if count <= 0:
            return
        rows = self.context.pool.write_extra(kv, count)
        sel = [torch.cat([s[0], rows.expand(s.shape[1], -1)], dim=1) for s in self.context.sel_idx]
        if self.context.selected_rows == 0:
            sel = [rows.expand(s.shape[1], -1) for s in self.context.sel_idx]
        self.context = SparseChunkAttention(self.context.pool, sel)
        self.cached_rows = count


def decode_with_chunks(
    lm,
    question_ids: list[int],
    chunks: list[ChunkKV],
    cfg: MethodConfig,
    sampler: SamplerConfig,
    seed: int = 0,
    on_step: Callable[[int, Tensor], None] | None = None,
    instruction: ChunkKV | None = None,
) -> DecodeResult:
    """Denoise the answer to `question_ids` over the selected `chunks` (document order), keeping cfg.keep_ratio of
    each chunk's tokens per layer and KV head. `instruction` (pdllm.method.instruction) is kept whole in front, at
    its positions 0..P-1 inside the shared window."""
    cfg.validate(lm.spec.max_position)
    sampler.validate()
    if not question_ids:
        raise InvalidRequest("question is empty")
    model, spec = lm.model, lm.spec
    for c in chunks:
        if c.k.shape[0] != spec.num_layers or c.k.shape[1] != spec.num_kv_heads or c.k.shape[3] != spec.head_dim:
            raise InvalidRequest(f"chunk {c.chunk_id[:12]} has KV of shape {tuple(c.k.shape)}: not from this model")
    t0 = time.perf_counter()
    picked = len(chunks)
    chunks = ([instruction] if instruction is not None else []) + list(chunks)
    start = max((c.length for c in chunks), default=0)
    extra = (len(question_ids) - (1 if spec.shift_logits else 0)) if cfg.keep_question_kv else 0
    pool = ChunkPool(chunks, spec.num_layers, spec.num_kv_heads, spec.head_dim, model.device, model.dtype, extra)
    lengths, has_bos = [c.length for c in chunks], [c.has_bos for c in chunks]
    q_layers = question_queries(lm, question_ids, start).q if cfg.keep_ratio < 1.0 and chunks else []
    whole = [instruction is not None and i == 0 for i in range(len(chunks))]
    k_layers = [pool.k[i] for i in range(spec.num_layers)]
    sel = select_tokens(q_layers, k_layers, lengths, has_bos, cfg.keep_ratio, keep_whole=whole)
    context = SparseChunkAttention(pool, sel)
    selection_s = time.perf_counter() - t0
    question = torch.tensor([question_ids], device=model.device)
    denoiser = SparseDenoiser(model, question, start, context, cfg.keep_question_kv)
    gen = torch.Generator(device=model.device).manual_seed(seed)
    result = denoise(denoiser, 1, sampler, spec.mask_token_id, spec.eos_token_ids, model.device, gen, on_step=on_step)
    steps = result.steps
    stats = {
        "selected_chunks": picked,
        "instruction_tokens": len(instruction.tokens) if instruction is not None else 0,
        "selected_tokens": context.selected_rows,
        "context_tokens_selected": sum(len(c.tokens) for c in chunks[len(chunks) - picked :]),
        "question_start_position": start,
        "keep_question_kv": cfg.keep_question_kv,
        "kv_tokens_per_step": context.selected_rows + len(question_ids) + sampler.gen_length,
        "steps": steps,
        "selection_ms": round(1000 * selection_s, 3),
        "decode_seconds": round(sum(result.step_seconds), 4),
        "mean_step_ms": round(1000 * sum(result.step_seconds) / max(steps, 1), 3),
    }
    return DecodeResult(tokens=result.tokens[0].tolist(), steps=steps, stats=stats)
