"""Which chunks, and which tokens inside them, a question attends to.

Scoring follows the attention route of the paper's code (menik1126/prefilling-dllm: chunk scores from the query's
attention to chunk keys at the last few layers; token eviction by query-to-chunk scores per layer and KV head,
max-pooled along the chunk, BOS always kept), but never runs a joint chunk+question forward:

* the question runs alone (a forward over its own tokens only) and its queries at every layer are captured;
* chunk ranking reads only each chunk's summary: the mean un-rotated key per KV head at the last
  `SUMMARY_LAYERS` layers. q . mean(k) is the question's mean attention logit over the chunk (RoPE removed from
  both sides, so it does not depend on where chunk or question sit); scores are averaged over question tokens and
  layers and summed over heads;
* token selection inside the kept chunks reads their keys at each layer: per KV head, a token's score is its best
  logit over question tokens and the head group's queries (RoPE kept: the question sits at its decode positions),
  max-pooled over `POOL_KERNEL` neighbours so a relevant span is kept whole.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from pdllm.errors import InvalidRequest
from pdllm.kernels import token_scores
from pdllm.models.attention import sdpa
from pdllm.models.layers import apply_rotary

SUMMARY_LAYERS = 2  # last layers whose mean keys form a chunk's summary
POOL_KERNEL = 7  # neighbourhood of the max-pooling over token scores


def summary_layers(num_layers: int) -> list[int]:
    return list(range(max(0, num_layers - SUMMARY_LAYERS), num_layers))


def unrotate(x: Tensor, positions: Tensor, rotary) -> Tensor:
    """Undo RoPE: x [..., T, D] was rotated at `positions` [T]; returns float32."""
    cos, sin = rotary.cos_sin(positions[None], torch.float32)
    return apply_rotary(x.float(), cos[0], -sin[0])


def summarize_keys(layer_keys: list[Tensor], length: int, has_bos: bool, rotary) -> Tensor:
    """Summary of one chunk from its keys at the summary layers ([Hkv, S', D] each, rows beyond `length` ignored):
    [layers, Hkv, D] float16, the mean un-rotated key of the chunk's tokens (the BOS anchor is the same in every
    chunk and carries no content)."""
    lo = 1 if has_bos else 0
    pos = torch.arange(lo, length, device=layer_keys[0].device)
    means = [unrotate(k[:, lo:length], pos, rotary).mean(dim=1) for k in layer_keys]
    return torch.stack(means).to(torch.float16)


class QueryCapture:
    """AttentionContext of the question-alone forward: plain self-attention that records each layer's queries."""

    def __init__(self) -> None:
        self.q: dict[int, Tensor] = {}

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        self.q[layer] = q[0]
        return sdpa(q, k, v)


@dataclass
class QuestionQueries:
    q: list[Tensor]  # per layer [Hq, Tq, D], RoPE at positions start..start+Tq-1
    positions: Tensor  # [Tq]


@torch.no_grad()
def question_queries(lm, question_ids: list[int], start: int = 0) -> QuestionQueries:
    """The question's queries at every layer from a forward over the question alone, placed at `start`."""
    if not question_ids:
        raise InvalidRequest("question is empty")
    model = lm.model
    ids = torch.tensor([question_ids], device=model.device)
    positions = torch.arange(start, start + len(question_ids), device=model.device)
    capture = QueryCapture()
    model(ids, position_ids=positions[None], context=capture, logits_from=None)
    return QuestionQueries(q=[capture.q[i] for i in range(len(model.layers))], positions=positions)


class PaddedQueryCapture:
    """Self-attention over questions padded to one length (padded keys masked) that keeps the queries of the
    chosen layers, [B, Hq, T, D] each."""

    def __init__(self, valid: Tensor | None, layers: list[int]) -> None:
        self.valid, self.layers = valid, set(layers)
        self.q: dict[int, Tensor] = {}

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if layer in self.layers:
            self.q[layer] = q
        return sdpa(q, k, v, self.valid)


@torch.no_grad()
def question_vectors(lm, questions: list[list[int]]) -> Tensor:
    """What chunk ranking needs of each question: its mean un-rotated query at the summary layers, summed over
    each KV head's query group, [B, L, Hkv, D] float32. One forward over every question (each alone: padded to the
    longest, padded keys masked), so questions that arrive together are ranked in one pass."""
    if not questions or any(not q for q in questions):
        raise InvalidRequest("question is empty")
    model, spec = lm.model, lm.spec
    longest = max(len(q) for q in questions)
    ids = torch.zeros(len(questions), longest, dtype=torch.long)
    for i, q in enumerate(questions):
        ids[i, : len(q)] = torch.tensor(q)
    lengths = torch.tensor([len(q) for q in questions], device=model.device)
    positions = torch.arange(longest, device=model.device)
    valid = positions[None] < lengths[:, None]  # [B, T]
    layers = summary_layers(spec.num_layers)
    capture = PaddedQueryCapture(None if bool(valid.all()) else valid, layers)
    model(ids.to(model.device), position_ids=positions.expand(len(questions), -1), context=capture, logits_from=None)
    q = torch.stack([unrotate(capture.q[i], positions, model.rotary) for i in layers], dim=1)  # [B, L, Hq, T, D]
    b, lsum, hq, t, d = q.shape
    weights = (valid.float() / lengths[:, None].float())[:, None, None, :, None]  # mean over each one's tokens
    q = (q * weights).sum(dim=3)  # [B, L, Hq, D]
    return q.reshape(b, lsum, spec.num_kv_heads, hq // spec.num_kv_heads, d).sum(dim=3)


def stack_summaries(lm, summaries: list[Tensor], device: torch.device) -> Tensor:
    """[N, L, Hkv, D] float32 on `device`, checked against the model's summary shape."""
    spec = lm.spec
    want = (len(summary_layers(spec.num_layers)), spec.num_kv_heads, spec.head_dim)
    s = torch.stack([x.to(device, torch.float32) for x in summaries])
    if s.shape[1:] != want:
        raise InvalidRequest(f"chunk summaries have shape {tuple(s.shape[1:])}, this model expects {want}")
    return s


def scores_from(vector: Tensor, summaries: Tensor) -> Tensor:
    """Relevance [N] of chunks with `summaries` [N, L, Hkv, D] to a question of `vector` [L, Hkv, D] (on device)."""
    lsum, _, d = vector.shape
    return torch.einsum("lhd,nlhd->n", vector, summaries) / (lsum * math.sqrt(d))


def chunk_scores(lm, question_ids: list[int], summaries: list[Tensor]) -> Tensor:
    """Relevance of each chunk to the question [N] float32, from summaries only."""
    if not summaries:
        return torch.empty(0)
    s = stack_summaries(lm, summaries, lm.model.device)
    return scores_from(question_vectors(lm, [question_ids])[0], s).cpu()


def check_top_k(top_k) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise InvalidRequest(f"top_k must be an integer >= 1, got {top_k!r}")


def top_chunks(scores: Tensor, top_k: int) -> list[int]:
    """Indices of the top-K scores (K clamped to their count) in document order."""
    return sorted(torch.topk(scores, min(top_k, scores.numel())).indices.tolist())


def rank_chunks(lm, question_ids: list[int], summaries: list[Tensor], top_k: int) -> list[int]:
    """Indices of the top-K chunks (K clamped to the chunk count) in document order; reads summaries only."""
    check_top_k(top_k)
    if not summaries:
        return []
    return top_chunks(chunk_scores(lm, question_ids, summaries), top_k)


def keep_count(num_tokens: int, keep_ratio: float) -> int:
    """Tokens of a chunk kept per layer and head (at least one; the BOS anchor comes on top)."""
    return max(1, min(num_tokens, math.ceil(keep_ratio * num_tokens - 1e-9)))


def select_tokens(
    q_layers: list[Tensor],
    k_pools: list[Tensor],
    lengths: list[int],
    has_bos: list[bool],
    keep_ratio: float,
    keep_whole: list[bool] | None = None,
) -> list[Tensor]:
    """Rows of the pool each layer's KV heads keep: per layer [Hkv, N] int32 flat indices slot*S + row, chunk by
    chunk in document order (N is the same for every layer and head). Slot i holds chunk i with lengths[i] rows;
    slots flagged in `keep_whole` (the instruction) keep every row."""
    n = len(lengths)
    keep_whole = keep_whole or [False] * n
    out = []
    for layer, k_pool in enumerate(k_pools):
        hkv, s = k_pool.shape[1], k_pool.shape[2]
        dev = k_pool.device
        if keep_ratio >= 1.0 or n == 0:
            rows = [torch.arange(lengths[i], device=dev) + i * s for i in range(n)]
            out.append(torch.cat(rows).to(torch.int32).expand(hkv, -1).contiguous() if rows else _empty(hkv, dev))
            continue
        slots = torch.arange(n, device=dev, dtype=torch.int32)
        scores = token_scores(q_layers[layer].to(k_pool.dtype), k_pool[:n], slots)  # [n, Hkv, S]
        tok = torch.arange(s, device=dev)
        parts = []
        for i in range(n):
            if keep_whole[i]:
                parts.append(torch.arange(lengths[i], device=dev, dtype=torch.long).expand(hkv, -1) + i * s)
                continue
            lo = 1 if has_bos[i] else 0
            sc = scores[i].masked_fill((tok < lo) | (tok >= lengths[i]), float("-inf"))
            sc = F.max_pool1d(sc[:, None], POOL_KERNEL, stride=1, padding=POOL_KERNEL // 2)[:, 0]
            sc = sc.masked_fill((tok < lo) | (tok >= lengths[i]), float("-inf"))
            keep = torch.topk(sc, keep_count(lengths[i] - lo, keep_ratio), dim=-1).indices.sort(dim=-1).values
            if lo:
                keep = torch.cat([torch.zeros(hkv, 1, dtype=keep.dtype, device=dev), keep], dim=1)
            parts.append(keep + i * s)
        out.append(torch.cat(parts, dim=1).to(torch.int32) if parts else _empty(hkv, dev))
    return out


def _empty(hkv: int, device) -> Tensor:
    return torch.zeros(hkv, 0, dtype=torch.int32, device=device)
