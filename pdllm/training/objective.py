"""LLaDA's masked-diffusion loss, focused on the answer, plus a chunk-ranking loss for predictive prefilling.

Per sequence draw t ~ U(eps, 1) and mask each eligible token with probability t: the answer span of SFT rows,
every token but BOS of pre-training rows. Cross-entropy on the masked tokens is weighted 1/t, as in LLaDA. Within
the answer span the end-token padding weighs `pad_weight` (the answer text and its first end token weigh 1), and
each row is normalized by its summed weights, so a 5-digit pass key is not drowned by ten padding tokens.

Chunk ranking (sparse mode) scores each chunk by q . mean(k): the question's mean un-rotated query, from a forward
over the question alone, against the chunk's mean un-rotated key at the last layers (pdllm.method.selection). The
ranking loss is cross-entropy of those scores against the chunk that holds the answer, so the summaries the decode
actor ranks by point at the needle.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from pdllm.method.selection import PaddedQueryCapture, summary_layers
from pdllm.models.layers import apply_rotary
from pdllm.models.transformer import DllmModel
from pdllm.training.data import BOS_ID, PAD_SEGMENT, Batch, attention_mask

RANK_BOUND = 8.0  # chunk scores enter the ranking loss squashed into (-8, 8)
MATCH_TEMPERATURE = 0.1  # cosines enter the match loss scaled by 1/0.1


class MaskedAttention:
    """An AttentionContext that applies a fixed [B, 1, T, T] boolean mask (chunk structure and padding); keeps the
    rotated queries and keys of the layers in `capture` (the pointer and key losses read them) and head 0's output
    of the layers in `outputs` (the match loss reads it). `tokens`: the batch's flat positions that are not padding
    (BatchLayout.tokens, on the CPU), for a forward that runs its per-token parts on those alone (training.stack,
    which moves them to the device only then); None: all of them."""

    def __init__(
        self, mask: Tensor, capture: tuple[int, ...] = (), outputs: tuple[int, ...] = (), tokens: Tensor | None = None
    ) -> None:
        self.mask, self.capture, self.outputs, self.tokens = mask, capture, outputs, tokens
        self.qk: dict[int, tuple[Tensor, Tensor]] = {}
        self.head0: dict[int, Tensor] = {}

    @classmethod
    def of_batch(
        cls, seg: Tensor, full: Tensor, capture: tuple[int, ...] = (), outputs: tuple[int, ...] = (),
        tokens: Tensor | None = None,
    ):  # fmt: skip
        """The attention of a batch whose layout is `seg` and `full` (data.attention_mask)."""
        return cls(attention_mask(seg, full), capture, outputs, tokens)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if layer in self.capture:
            self.qk[layer] = (q, k)
        out = self.attention(q, k, v)
        if layer in self.outputs:
            self.head0[layer] = out[:, 0]  # [B, T, D]
        return out

    def attention(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Softmax attention under the mask (PyTorch SDPA; flex.FlexMaskedAttention skips the masked blocks)."""
        return masked_attention(q, k, v, self.mask)


def masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """SDPA under a boolean mask that broadcasts to [B, H, Tq, Tk] (GQA when k has fewer heads than q)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])


@dataclass(frozen=True)
class BatchLayout:
    """What the loss needs to know of a batch's layout before it runs: read on the CPU copy of the batch, so the
    step on a GPU waits on nothing (each of these read off a device tensor stalls the launch queue)."""

    first: int  # first position whose logits the loss reads (0 when any row is a pre-training row)
    ranked: bool  # chunked rows with a known needle chunk: the ranking loss can run
    chunks: int  # chunks of the longest chunked row
    pointed: bool = False  # some answer token copies a known context token: the pointer loss can run
    keyed: bool = False  # some value token has a known key: the key loss can run
    tokens: Tensor | None = None  # [N] the flat positions (row * T + t) that are not padding; None: no padding


def batch_layout(batch: Batch, pack: bool = False) -> BatchLayout:
    """What the batch holds; whether each auxiliary loss runs is its weight's business (diffusion_loss). `pack`:
    find the positions that are not padding (`tokens`, for train.py --pack-tokens; a step that does not pack skips
    the search, 0.3 ms of host time at 64K tokens a batch)."""
    first = 0 if bool(batch.pretrain.any()) else int(batch.answer.float().argmax(-1).min())
    ranked = bool((batch.needle_seg >= 0).any())
    pointed = bool((batch.pointer >= 0).any())
    keyed = bool((batch.key_hi > batch.key_lo).any())
    real = (batch.seg != PAD_SEGMENT).flatten() if pack else None
    tokens = None if real is None or bool(real.all()) else real.nonzero()[:, 0]
    return BatchLayout(first, ranked, int(batch.seg.max()) + 1, pointed, keyed, tokens)


def key_layer(num_layers: int) -> int:
    """The layer whose first head the key loss teaches to gather the key a value sits under: a quarter up."""
    return num_layers // 4


def head_scores(qk: tuple[Tensor, Tensor], rows: Tensor, mask: Tensor) -> Tensor:
    """[B, R, T] float32: head 0's attention scores from the tokens `rows` [B, R] over every key, -inf where the
    attention mask hides the key (what the head's softmax runs over)."""
    q, k = qk
    q0 = q[:, 0].gather(1, rows[:, :, None].expand(-1, -1, q.shape[-1])).float()
    scores = torch.einsum("brd,btd->brt", q0, k[:, 0].float()) / math.sqrt(q.shape[-1])
    seen = mask[:, 0].gather(1, rows[:, :, None].expand(-1, -1, mask.shape[-1]))
    return scores.masked_fill(~seen, float("-inf"))


def key_loss(batch: Batch, qk: tuple[Tensor, Tensor], mask: Tensor) -> tuple[Tensor, Tensor]:
    """(loss, mean attention mass on the key): log1p(-log) of the attention one head puts, from each value token
    (in the context, under its key; in an answer, on the key its question names), on that key's tokens. With it both
    sides of a lookup hold a summary of the same key, which the pointer head above only has to compare."""
    scores = head_scores(qk, batch.key_from, mask)  # [B, K, T]
    t = torch.arange(scores.shape[-1], device=scores.device)
    in_key = (t >= batch.key_lo[:, :, None]) & (t < batch.key_hi[:, :, None])
    valid = batch.key_hi > batch.key_lo
    total = torch.logsumexp(scores, -1)
    on_key = torch.logsumexp(scores.masked_fill(~in_key, float("-inf")), -1)
    per = torch.where(valid, total - on_key, 0.0)  # -log(mass on the key), unbounded while the head looks away
    n = valid.sum().clamp_min(1)
    # log1p: a head that starts far from the key (-log mass ~ 20 on the bundle) keeps its gradient's direction but
    # cannot drown the diffusion loss under the global gradient clip (a CPU run lost niah_single that way)
    return torch.log1p(per).sum() / n, torch.where(valid, torch.exp(-per), 0.0).sum() / n


def match_loss(batch: Batch, head0: Tensor, temperature: float = MATCH_TEMPERATURE) -> tuple[Tensor, Tensor]:
    """(loss, top-1 accuracy): contrastive loss on what the key head carries. From each answer token that copies a
    context value, the cosine of the key head's output there against its output at every context value token of the
    row; the right ones are the value tokens under the key the copied token sits under (InfoNCE with several
    positives). The key loss only teaches where that head looks; this teaches its values and output to say which
    key it saw, the same way on the question's side and the context's, so the pointer head has something to match.
    Rows with one key among their context values teach nothing here and are left out."""
    o = F.normalize(head0.float(), dim=-1)  # [B, T, D]
    take = lambda rows: o.gather(1, rows[:, :, None].expand(-1, -1, o.shape[-1]))  # noqa: E731
    context = (batch.key_hi > batch.key_lo) & (batch.seg.gather(1, batch.key_from) >= 0)  # [B, K]
    copies = batch.pointer >= 0  # [B, P]
    source = (batch.key_from[:, None, :] == batch.pointer[:, :, None]) & context[:, None, :]  # [B, P, K]
    found = source.any(-1) & copies
    key_of_source = (source * batch.key_lo[:, None, :]).sum(-1)  # the key span (by its start) the copy sits under
    right = context[:, None, :] & (batch.key_lo[:, None, :] == key_of_source[:, :, None])  # [B, P, K]
    scores = torch.einsum("bpd,bkd->bpk", take(batch.pointer_at), take(batch.key_from)) / temperature
    scores = scores.masked_fill(~context[:, None, :], float("-inf"))
    valid = found & (right.sum(-1) < context.sum(-1)[:, None])  # some context value of another key to tell apart
    per = torch.logsumexp(scores, -1) - torch.logsumexp(scores.masked_fill(~right, float("-inf")), -1)
    n = valid.sum().clamp_min(1)
    best_right = right.gather(-1, scores.argmax(-1, keepdim=True))[..., 0]
    return torch.where(valid, per, 0.0).sum() / n, (best_right & valid).sum() / n


def pointer_layer(num_layers: int) -> int:
    """The layer whose first head the pointer loss teaches to look at the value being copied: three quarters up,
    so the layers below can build the key-matching features and the ones above can still use what it reads."""
    return (3 * num_layers) // 4


def pointer_loss(batch: Batch, qk: tuple[Tensor, Tensor], mask: Tensor) -> tuple[Tensor, Tensor]:
    """(loss, top-1 accuracy): cross-entropy of one head's attention scores from each answer-text token over the
    keys it may attend to, against the context token holding the byte it must produce. A training aid like the
    ranking loss: it gives key -> value lookups (kv_retrieval, niah_multikey) a direct signal, where the
    diffusion loss alone lets a small model settle for copying whichever value looks like an answer."""
    scores = head_scores(qk, batch.pointer_at, mask)
    target = batch.pointer
    loss = F.cross_entropy(scores.reshape(-1, scores.shape[-1]), target.reshape(-1), ignore_index=-1)
    valid = target >= 0
    acc = ((scores.argmax(-1) == target) & valid).sum() / valid.sum().clamp_min(1)
    return loss, acc


def mask_tokens(batch: Batch, mask_id: int, eps: float, generator: torch.Generator | None = None):
    """Returns (noisy ids, masked bool [B, T], t [B], eligible [B, T])."""
    b = batch.ids.shape[0]
    dev = batch.ids.device
    t = eps + (1 - eps) * torch.rand(b, device=dev, generator=generator)
    every = (batch.seg != PAD_SEGMENT) & (batch.ids != BOS_ID)
    eligible = torch.where(batch.pretrain[:, None], every, batch.answer)
    masked = (torch.rand(batch.ids.shape, device=dev, generator=generator) < t[:, None]) & eligible
    noisy = torch.where(masked, torch.full_like(batch.ids, mask_id), batch.ids)
    return noisy, masked, t, eligible


def unrotate(x: Tensor, positions: Tensor, rotary) -> Tensor:
    """Undo RoPE on x [B, H, T, D] rotated at positions [B, T]; float32."""
    cos, sin = rotary.cos_sin(positions, torch.float32)
    return apply_rotary(x.float(), cos, -sin)


def summary_scores(
    rotary, keys: list[Tensor], queries: list[Tensor], pos: Tensor, qpos: Tensor, onehot: Tensor, counts: Tensor,
    qvalid: Tensor, across_rows: bool,
) -> Tensor:  # fmt: skip
    """The chunk scores of ranking_scores from the summary layers' keys [B, H, T, D] (rotated at `pos`) and the
    question's queries [B, Hq, Q, D] (at `qpos`): q . mean(k) un-rotated, summed over layers and each KV head's
    query group, over len(layers) * sqrt(D). `onehot` [B, T, C] marks each chunk's content tokens, `counts` [B, C]
    their number. [B, C], or [B, B * C] across rows."""
    qv = qvalid[:, None, :, None].float()
    d = keys[0].shape[-1]
    member, sizes = onehot.float(), counts.clamp_min(1)[:, :, None, None]
    qs, means = [], []
    for k, q in zip(keys, queries, strict=True):
        k = unrotate(k, pos, rotary)  # [B, H, T, D]
        m = torch.einsum("bhtd,btc->bchd", k, member) / sizes
        q = unrotate(q, qpos, rotary)  # [B, Hq, Q, D]
        q = (q * qv).sum(2) / qv.sum(2)  # mean over the question's tokens
        qs.append(q.view(q.shape[0], m.shape[2], -1, d).sum(2))  # sum over each KV head's query group
        means.append(m)
    q, m = torch.stack(qs, 1), torch.stack(means, 2)  # [B, L, H, D], [B, C, L, H, D]
    norm = len(keys) * math.sqrt(d)
    if across_rows:
        return torch.einsum("blhd,nclhd->bnc", q, m).flatten(1) / norm
    return torch.einsum("blhd,bclhd->bc", q, m) / norm


def ranking_scores(
    model: DllmModel,
    batch: Batch,
    kv: list[tuple[Tensor, Tensor]],
    n_chunks: int | None = None,
    across_rows: bool = False,
    summary: Callable[..., Tensor] = summary_scores,
) -> tuple[Tensor, Tensor]:
    """(scores [B, C], valid [B, C]) of every chunk of every chunked row, computed as chunk_scores does; a row's
    chunks before its `ranked_from` (an instruction kept apart, which the engine keeps and never ranks) are not valid;
    `n_chunks` (default: read off `batch.seg`) is C. `across_rows`: each row's question against the chunks of
    every row, [B, B * C] (row n's chunk c at column n * C + c; see cross_row_valid). `summary`: summary_scores,
    or a compiled copy of it (LossTerms)."""
    layers = summary_layers(model.spec.num_layers)
    seg = batch.seg
    n_chunks = int(seg.max()) + 1 if n_chunks is None else n_chunks
    content = (seg >= 0) & (batch.ids != BOS_ID)
    onehot = (seg[:, :, None] == torch.arange(n_chunks, device=seg.device)) & content[:, :, None]  # [B, T, C]
    counts = onehot.sum(1)  # [B, C]
    cap = PaddedQueryCapture(batch.question_valid, layers)
    qpos = torch.arange(batch.question.shape[1], device=seg.device).expand_as(batch.question)
    model(batch.question, position_ids=qpos, context=cap, logits_from=None)
    keys, queries = [kv[i][0] for i in layers], [cap.q[i] for i in layers]
    scores = summary(model.rotary, keys, queries, batch.pos, qpos, onehot, counts, batch.question_valid, across_rows)
    rankable = (counts > 0) & (torch.arange(n_chunks, device=seg.device)[None, :] >= batch.ranked_from[:, None])
    return scores, cross_row_valid(rankable, batch.needle_seg) if across_rows else rankable


def cross_row_valid(valid: Tensor, needle_seg: Tensor) -> Tensor:
    """[B, B * C]: the chunks a row's question is ranked against across rows: its own row's, and every other ranked
    row's chunks but that row's needle chunk (another row's needle may answer this question's wording as well: a
    pass key sentence answers every pass key question). Rows without a needle chunk (dense rows, chunked rows whose
    needle was not found) lend no chunks."""
    b, c = valid.shape
    lends = valid & (needle_seg >= 0)[:, None]
    lends = lends & (torch.arange(c, device=valid.device)[None, :] != needle_seg[:, None])
    own = torch.eye(b, dtype=torch.bool, device=valid.device)[:, :, None]
    return torch.where(own, valid[None, :, :], lends[None, :, :]).flatten(1)


def answer_loss(logits: Tensor, target: Tensor, scale: Tensor, core: Tensor) -> tuple[Tensor, Tensor]:
    """(loss, accuracy): the masked-diffusion cross-entropy over every scored position, weighted by `scale` [B, T']
    (1/t, the padding weight and the row's norm; 0 where not masked), summed per batch row; and the accuracy on
    the masked answer-text tokens `core`."""
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
    loss = (ce.view_as(target) * scale).sum() / target.shape[0]
    hits = ((logits.argmax(-1) == target) & core).sum()
    return loss, hits / core.sum().clamp_min(1)


def rank_loss(scores: Tensor, valid: Tensor, needle_seg: Tensor, chunks: int, across_rows: bool):
    """(loss, top-1 accuracy) of the chunk ranking: cross-entropy of the bounded scores against each row's needle
    chunk (its column across rows), over the rows that have one."""
    rows, target = needle_seg >= 0, needle_seg
    scores = RANK_BOUND * torch.tanh(scores.float() / RANK_BOUND)  # bounded: no reward for ever larger q.k
    scores = scores.masked_fill(~valid, float("-inf"))
    if across_rows:
        b = scores.shape[0]
        target = torch.where(rows, target + torch.arange(b, device=target.device) * chunks, -1)
    loss = F.cross_entropy(scores, target, ignore_index=-1)  # the mean over rows with a needle chunk
    top1 = ((scores.argmax(-1) == target) & rows).sum() / rows.sum().clamp_min(1)
    return loss, top1


@dataclass(frozen=True)
class LossTerms:
    """The tensor-only parts of diffusion_loss, which compile_losses compiles: an eager step launches each of
    their few hundred small kernels (forward and backward) from the host, which sets a GPU step's pace."""

    answer: Callable = answer_loss
    pointer: Callable = pointer_loss
    key: Callable = key_loss
    match: Callable = match_loss
    summary: Callable = summary_scores
    rank: Callable = rank_loss


def compile_losses(backend: str = "inductor") -> LossTerms:
    """LossTerms each compiled (dynamic shapes: batches come in hundreds of shapes); train.py --compile
    stack+losses."""
    parts = dataclasses.fields(LossTerms)
    return LossTerms(**{f.name: torch.compile(f.default, backend=backend, dynamic=True) for f in parts})


def diffusion_loss(
    model: DllmModel,
    batch: Batch,
    eps: float = 0.1,
    generator: torch.Generator | None = None,
    pad_weight: float = 0.1,
    rank_weight: float = 0.0,
    layout: BatchLayout | None = None,
    pointer_weight: float = 0.0,
    key_weight: float = 0.0,
    match_weight: float = 0.0,
    pointer_at_layer: int | None = None,
    attention_class: type[MaskedAttention] = MaskedAttention,
    rank_across_rows: bool = False,
    terms: LossTerms = LossTerms(),
) -> tuple[Tensor, dict[str, Tensor]]:
    """(loss, metrics) for one batch. Metrics (detached tensors): the diffusion loss, the accuracy on masked
    answer-text tokens and, for chunked batches with rank_weight > 0, the ranking loss and its top-1 accuracy.
    `layout`: batch_layout of the batch's CPU copy (default: computed here, which waits on the device). Every
    position from `first` on is scored and weighted (zero where not masked) rather than gathered by a boolean
    index, whose size the host would have to wait for. `pointer_at_layer`: the layer whose head 0 the pointer loss
    trains (default: pointer_layer, three quarters up). `attention_class`: how the masked attention is computed
    (MaskedAttention, or flex.FlexMaskedAttention). `rank_across_rows`: the ranking loss ranks each question's
    needle chunk against every row's chunks (ranking_scores), so a batch of short rows trains the ranking among as
    many chunks as a long document has; its accuracy metric stays the row's own top-1. `terms`: the loss parts
    (LossTerms; compile_losses for compiled ones)."""
    layout = layout or batch_layout(batch)
    noisy, masked, t, eligible = mask_tokens(batch, model.spec.mask_token_id, eps, generator)
    first = layout.first
    ranked = rank_weight > 0 and layout.ranked
    pointed = pointer_weight > 0 and layout.pointed
    keyed = key_weight > 0 and layout.keyed
    matched = match_weight > 0 and layout.pointed and layout.keyed
    layers = model.spec.num_layers
    point_layer = pointer_layer(layers) if pointer_at_layer is None else pointer_at_layer
    capture = ((point_layer,) if pointed else ()) + ((key_layer(layers),) if keyed else ())
    outputs = (key_layer(layers),) if matched else ()
    attention = attention_class.of_batch(batch.seg, batch.full, capture, outputs, layout.tokens)
    out = model(noisy, batch.pos, attention, return_kv=ranked, logits_from=first)
    target = batch.ids[:, first:]
    m = masked[:, first:]
    w = torch.where(batch.core | ~batch.answer, 1.0, pad_weight)  # padding of the answer span weighs less
    norm = (w * eligible).sum(-1).clamp_min(1e-6)  # per row
    scale = (w / (t[:, None] * norm[:, None]))[:, first:] * m
    loss, acc = terms.answer(out.logits, target, scale, batch.core[:, first:] & m)
    metrics = {"diff": loss.detach(), "acc": acc}
    if pointed:
        point, point_acc = terms.pointer(batch, attention.qk[point_layer], attention.mask)
        loss = loss + pointer_weight * point
        metrics |= {"point": point.detach(), "point_acc": point_acc}
    if keyed:
        gather, mass = terms.key(batch, attention.qk[key_layer(layers)], attention.mask)
        loss = loss + key_weight * gather
        metrics |= {"key": gather.detach(), "key_mass": mass.detach()}
    if matched:
        match, match_acc = terms.match(batch, attention.head0[key_layer(layers)])
        loss = loss + match_weight * match
        metrics |= {"match": match.detach(), "match_acc": match_acc}
    if ranked:
        scores, valid = ranking_scores(model, batch, out.kv, layout.chunks, rank_across_rows, terms.summary)
        rank, top1 = terms.rank(scores, valid, batch.needle_seg, layout.chunks, rank_across_rows)
        loss = loss + rank_weight * rank
        metrics |= {"rank": rank.detach(), "rank_acc": top1}
    return loss, metrics
