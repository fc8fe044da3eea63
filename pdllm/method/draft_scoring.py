"""Draft-likelihood chunk ranking (the paper's predictive scoring), over the cached chunk KV.

1. Draft: a few answer tokens are denoised from [instruction, question] alone (no context): the first masked slot
   is taken from one forward, then each partial round confirms the most confident remaining slot.
2. Score: for every chunk, the mean log-probability of the question tokens and the confirmed draft tokens given
   [instruction, BOS + chunk]. A chunk that makes the question and its likely answer probable holds the evidence.

Layout of one chunk's scoring pass, at continuous positions: the instruction's cached KV at 0..P-1, the chunk's
cached KV re-rotated to P..P+S-1 (RoPE is a rotation by position, so moving a cached key by P is one more rotation:
no re-encoding, and the chunk's KV stays shareable across requests), and the span (question + draft) at P+S...
Only the span runs through the model; its queries attend to [instruction rows, the chunk's rows] of a pool and to
the span itself. Chunks are batched: one request per chunk (per chunk and scored token for LLaDA) over one pool.

* Shifted-logit models (Dream): the span is causal and position i-1 predicts token i, so every scored token is
  read from one pass; the span's first token is predicted from the chunk's last row, which the span does not
  recompute, so it is not scored.
* Unshifted models (LLaDA): a token is predicted at its own position from a masked input, so each scored token gets
  its own copy of the span with that token masked (leave-one-out), bidirectional; the copies share the pool rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from pdllm.errors import InvalidRequest
from pdllm.kernels import attention
from pdllm.method.chunk_kv import ChunkKV
from pdllm.models.attention import DenseCachedAttention, SelfAttention
from pdllm.models.layers import apply_rotary

MAX_REQUESTS = 256  # span copies per batched pass (chunks x leave-one-out copies)
MAX_LOGIT_ROWS = 2048  # vocabulary-wide logit rows per pass (Dream's 152K vocabulary: 1.2 GB in float32)


@dataclass(frozen=True)
class Draft:
    tokens: list[int]  # draft slots: confirmed tokens, mask ids where unconfirmed
    confirmed: list[bool]


def rotate_keys(k: Tensor, offset: int, rotary) -> Tensor:
    """Cached keys [..., S, D] rotated at positions p, returned rotated at p + offset (float32 math)."""
    if offset == 0:
        return k
    pos = torch.tensor([[offset]], device=k.device)
    cos, sin = rotary.cos_sin(pos, torch.float32)
    return apply_rotary(k.float(), cos[0, 0], sin[0, 0]).to(k.dtype)


def _prefix_context(instruction: ChunkKV | None):
    if instruction is None:
        return SelfAttention()
    layers = range(instruction.k.shape[0])
    return DenseCachedAttention([(instruction.k[i][None], instruction.v[i][None]) for i in layers])


@torch.no_grad()
def draft_answer(lm, question_ids: list[int], instruction: ChunkKV | None, tokens: int, rounds: int) -> Draft:
    """Draft `tokens` answer slots from [instruction, question] without context (greedy); 1 + `rounds` of them are
    confirmed. Without an instruction the span starts with BOS so the question is read as a sequence start."""
    if tokens <= 0:
        return Draft([], [])
    model, spec = lm.model, lm.spec
    lead = [spec.bos_token_id] if instruction is None and spec.bos_token_id is not None else []
    prompt = lead + list(question_ids)
    start = instruction.length if instruction is not None else 0
    draft = [spec.mask_token_id] * tokens
    confirmed = [False] * tokens
    context = _prefix_context(instruction)
    for r in range(1 + max(0, rounds)):
        open_slots = [i for i, c in enumerate(confirmed) if not c]
        if not open_slots:
            break
        x = torch.tensor([prompt + draft], device=model.device)
        pos = torch.arange(start, start + x.shape[1], device=model.device)[None]
        p = len(prompt)
        first = p - 1 if spec.shift_logits else p
        out = model(x, position_ids=pos, context=context, logits_from=first)
        logits = model.token_logits(out.logits, p - first, tokens)[0]  # [tokens, V]
        probs = torch.softmax(logits.float(), dim=-1)
        conf, best = probs.max(dim=-1)
        slot = 0 if r == 0 else max(open_slots, key=lambda i: float(conf[i]))
        draft[slot], confirmed[slot] = int(best[slot]), True
    return Draft(draft, confirmed)


def scored_positions(span_len: int, scored: list[bool], shift: bool) -> list[int]:
    """Span positions whose tokens count in the score (shifted models cannot score position 0)."""
    return [i for i in range(span_len) if scored[i] and not (shift and i == 0)]


class PoolRowsAttention:
    """Each request's span attends to its chunk's rows of a per-layer pool ([slots, Hkv, S, D], slot 0 the
    instruction) and to itself. Requests come chunk-major, `copies` per chunk (leave-one-out), and share their
    chunk's rows: `sel` [n, W] / `sel_len` [n] name them once per chunk.

    On CUDA, bidirectional spans go through `pdllm.kernels.attention` (rows read in place, the copies referencing
    the same rows) and causal ones through SDPA over the gathered rows; elsewhere the rows are gathered once per
    chunk and every copy's queries are scored against them in one matmul."""

    def __init__(self, k_pool: Tensor, v_pool: Tensor, sel: Tensor, sel_len: Tensor, copies: int, causal: bool):
        self.k_pool, self.v_pool, self.sel, self.sel_len = k_pool, v_pool, sel, sel_len
        self.copies, self.causal = copies, causal

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        kp, vp = self.k_pool[layer], self.v_pool[layer]
        if q.is_cuda and not self.causal:
            b, t = q.shape[0], q.shape[2]
            self_len = torch.full((b,), t, dtype=torch.int32, device=q.device)
            sel = self.sel.repeat_interleave(self.copies, dim=0)[:, None].expand(-1, k.shape[1], -1)
            return attention(q, k, v, self_len, kp, vp, sel, self.sel_len.repeat_interleave(self.copies))
        if q.is_cuda and self.copies == 1:
            return self._causal_sdpa(q, k, v, kp, vp)
        return self._shared_rows(q, k, v, kp, vp)

    def _causal_sdpa(self, q, k, v, kp, vp) -> Tensor:
        """One request per chunk: its rows gathered, then SDPA with a [rows | causal span] mask."""
        b, t, s = q.shape[0], q.shape[2], kp.shape[2]
        idx = self.sel.long()
        pk = kp[idx // s, :, idx % s].transpose(1, 2)  # [B, Hkv, W, D]
        pv = vp[idx // s, :, idx % s].transpose(1, 2)
        n = idx.shape[1]
        prefix_ok = (torch.arange(n, device=q.device)[None] < self.sel_len[:, None])[:, None, None, :]
        causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()[None, None]
        mask = torch.cat([prefix_ok.expand(b, 1, t, n), causal.expand(b, 1, t, t)], dim=-1)
        keys, vals = torch.cat([pk.to(k.dtype), k], dim=2), torch.cat([pv.to(v.dtype), v], dim=2)
        return F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])

    def _shared_rows(self, q, k, v, kp, vp) -> Tensor:
        n, w = self.sel.shape
        m = self.copies
        b, hq, t, d = q.shape
        hkv = k.shape[1]
        g = hq // hkv
        s = kp.shape[2]
        idx = self.sel.long()
        pk = kp[idx // s, :, idx % s].transpose(1, 2).float()  # [n, Hkv, W, D]: once per chunk
        pv = vp[idx // s, :, idx % s].transpose(1, 2).float()
        qf = q.float().reshape(n, m, hkv, g * t, d)
        s_pre = torch.einsum("nmhqd,nhwd->nmhqw", qf, pk)  # every copy's queries against its chunk's rows
        s_own = torch.einsum("nmhqd,nmhkd->nmhqk", qf, k.float().reshape(n, m, hkv, t, d))
        ok = torch.arange(w, device=q.device)[None] < self.sel_len[:, None]  # [n, W]
        s_pre = s_pre.masked_fill(~ok[:, None, None, None, :], float("-inf"))
        if self.causal:
            later = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1).repeat(g, 1)  # [G*T, T]
            s_own = s_own.masked_fill(later, float("-inf"))
        probs = torch.softmax(torch.cat([s_pre, s_own], dim=-1) / d**0.5, dim=-1)
        out = torch.einsum("nmhqw,nhwd->nmhqd", probs[..., :w], pv)
        out = out + torch.einsum("nmhqk,nmhkd->nmhqd", probs[..., w:], v.float().reshape(n, m, hkv, t, d))
        return out.reshape(b, hq, t, d).to(q.dtype)


@torch.no_grad()
def draft_chunk_scores(
    lm,
    chunks: list[ChunkKV],
    span_ids: list[int],
    scored: list[bool],
    instruction: ChunkKV | None = None,
    max_requests: int = MAX_REQUESTS,
) -> Tensor:
    """Mean log-probability [N] float32 of the span's scored tokens given [instruction, chunk], per chunk."""
    if len(scored) != len(span_ids):
        raise InvalidRequest(f"scored has {len(scored)} flags for a span of {len(span_ids)} tokens")
    shift = lm.spec.shift_logits
    targets = scored_positions(len(span_ids), scored, shift)
    if not chunks:
        return torch.empty(0)
    if not targets:
        raise InvalidRequest("no span token to score")
    copies = 1 if shift else len(targets)
    per_pass = max(1, min(max_requests // copies, MAX_LOGIT_ROWS // len(targets)))
    out = []
    for lo in range(0, len(chunks), per_pass):
        out.append(_score_group(lm, chunks[lo : lo + per_pass], span_ids, targets, instruction, shift))
    return torch.cat(out)


def _score_group(lm, chunks, span_ids, targets, instruction, shift) -> Tensor:
    model, spec = lm.model, lm.spec
    dev, dtype = model.device, model.dtype
    p = instruction.length if instruction is not None else 0
    n, t = len(chunks), len(span_ids)
    rows = max([c.length for c in chunks] + ([p] if p else []))
    first_slot = 1 if p else 0
    shape = (spec.num_layers, first_slot + n, spec.num_kv_heads, rows, spec.head_dim)
    k_pool = torch.zeros(shape, device=dev, dtype=dtype)
    v_pool = torch.zeros(shape, device=dev, dtype=dtype)
    if p:
        k_pool[:, 0, :, :p] = instruction.k.to(dev, dtype)
        v_pool[:, 0, :, :p] = instruction.v.to(dev, dtype)
    for i, c in enumerate(chunks):
        k_pool[:, first_slot + i, :, : c.length] = rotate_keys(c.k.to(dev, dtype), p, model.rotary)
        v_pool[:, first_slot + i, :, : c.length] = c.v.to(dev, dtype)
    lengths = torch.tensor([c.length for c in chunks], device=dev)
    width = p + int(lengths.max())
    col = torch.arange(width, device=dev)[None]
    chunk_rows = (first_slot + torch.arange(n, device=dev))[:, None] * rows + (col - p)
    sel = torch.where(col < p, col, chunk_rows).to(torch.int32)  # [n, width]: instruction rows, then the chunk's
    sel_len = (p + lengths).to(torch.int32)
    span = torch.tensor(span_ids, device=dev)
    target_t = torch.tensor(targets, device=dev)
    if shift:
        ids = span.expand(n, t)
        pos = (p + lengths)[:, None] + torch.arange(t, device=dev)[None]
        logits_index = (target_t - 1).expand(n, -1)
    else:  # one copy per (chunk, scored token) with that token masked
        m = len(targets)
        ids = span.repeat(n * m, 1)
        ids[torch.arange(n * m, device=dev), target_t.repeat(n)] = spec.mask_token_id
        pos = ((p + lengths)[:, None] + torch.arange(t, device=dev)[None]).repeat_interleave(m, dim=0)
        logits_index = target_t.repeat(n)[:, None]
    context = PoolRowsAttention(k_pool, v_pool, sel, sel_len, 1 if shift else len(targets), causal=shift)
    logits = model(ids, position_ids=pos, context=context, logits_rows=logits_index).logits  # [B, R, V]
    labels = span[target_t]
    labels = labels.expand(n, -1)[..., None] if shift else labels.repeat(n)[:, None, None]  # [B, R, 1]
    token_logp = logits.gather(-1, labels)[..., 0] - torch.logsumexp(logits, dim=-1)  # no second vocab-wide tensor
    return token_logp.reshape(n, -1).mean(dim=1).float().cpu()


def rank_by_draft(
    lm, question_ids: list[int], chunks: list[ChunkKV], top_k: int, instruction: ChunkKV | None, cfg
) -> tuple[list[int], dict]:
    """Top-K chunk indices (document order) by draft likelihood, and what the ranking saw."""
    draft = draft_answer(lm, question_ids, instruction, cfg.draft_tokens, cfg.draft_rounds)
    span = list(question_ids) + draft.tokens
    scored = [True] * len(question_ids) + draft.confirmed
    scores = draft_chunk_scores(lm, chunks, span, scored, instruction)
    k = min(top_k, len(chunks))
    picked = sorted(torch.topk(scores, k).indices.tolist()) if chunks else []
    return picked, {"draft_tokens": [t for t, c in zip(draft.tokens, draft.confirmed, strict=True) if c]}
