"""Draft-likelihood scoring over cached chunk KV equals a reference that re-encodes every chunk with the instruction.

The reference runs one forward per chunk over [BOS + instruction, BOS + chunk, span] at continuous positions, with
the instruction and the chunk each attending only to themselves (what their cached KV holds) and the span to all of
it: causally within the span for shifted-logit models, and one copy per scored token with that token masked
(leave-one-out) for LLaDA. The cached path instead re-rotates stored chunk keys and batches all chunks over a pool.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from pdllm.errors import InvalidRequest
from pdllm.method import MethodConfig, encode_chunks
from pdllm.method.chunk_cache import ChunkCache
from pdllm.method.draft_scoring import draft_answer, draft_chunk_scores, rank_by_draft, rotate_keys, scored_positions
from pdllm.method.instruction import encode_instruction, instruction_id, instruction_kv
from pdllm.models.layers import apply_rotary
from pdllm.models.loader import LoadedModel
from pdllm.models.tiny import random_model, tiny_spec


def tiny_lm(family: str, kv_heads: int | None = None, seed: int = 0) -> LoadedModel:
    spec = tiny_spec(family, layers=2, kv_heads=kv_heads)
    return LoadedModel(random_model(spec, seed), None, spec, Path("."), f"tiny-{family}-{seed}")


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 250, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


class BlockMaskAttention:
    def __init__(self, mask: torch.Tensor) -> None:
        self.mask = mask  # [B, 1, T, T] bool

    def attend(self, layer, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, enable_gqa=k.shape[1] != q.shape[1])


@torch.no_grad()
def reference_score(lm, instruction: list[int], chunk: list[int], span: list[int], scored: list[bool]) -> float:
    spec = lm.spec
    bos = [spec.bos_token_id]
    pre, body = bos + instruction if instruction else [], bos + chunk
    seq = pre + body + span
    p, s, t = len(pre), len(body), len(span)
    n = len(seq)
    mask = torch.zeros(n, n, dtype=torch.bool)
    mask[:p, :p] = True
    mask[p : p + s, p : p + s] = True
    mask[p + s :, : p + s] = True
    own = torch.ones(t, t, dtype=torch.bool)
    mask[p + s :, p + s :] = own.tril() if spec.shift_logits else own
    targets = scored_positions(t, scored, spec.shift_logits)
    logps = []
    if spec.shift_logits:
        logits = lm.model(torch.tensor([seq]), context=BlockMaskAttention(mask[None, None])).logits[0]
        logps = [F.log_softmax(logits[p + s + j - 1], -1)[span[j]] for j in targets]
    else:
        for j in targets:
            x = list(seq)
            x[p + s + j] = spec.mask_token_id
            logits = lm.model(torch.tensor([x]), context=BlockMaskAttention(mask[None, None])).logits[0]
            logps.append(F.log_softmax(logits[p + s + j], -1)[span[j]])
    return float(torch.stack(logps).mean())


@pytest.mark.parametrize("family,kv_heads", [("llada", None), ("dream", 2)])
@pytest.mark.parametrize("with_instruction", [True, False])
def test_draft_scores_equal_reencoding_reference(family, kv_heads, with_instruction):
    lm = tiny_lm(family, kv_heads)
    cfg = MethodConfig(chunk_size=16)
    chunks = [ids(16, 1), ids(16, 2), ids(16, 3), ids(9, 4)]  # the last one shorter, as a document's tail is
    kvs = encode_chunks(lm, chunks, cfg, lm.model_id)
    instruction = ids(11, 5) if with_instruction else []
    instr = encode_instruction(lm, instruction, lm.model_id) if instruction else None
    question = ids(6, 6)
    draft = draft_answer(lm, question, instr, tokens=4, rounds=1)
    assert len(draft.tokens) == 4 and sum(draft.confirmed) == 2
    assert all((t == lm.spec.mask_token_id) != c for t, c in zip(draft.tokens, draft.confirmed, strict=True))
    span = question + draft.tokens
    scored = [True] * len(question) + draft.confirmed
    got = draft_chunk_scores(lm, kvs, span, scored, instr, max_requests=7)  # several batched passes
    want = torch.tensor([reference_score(lm, instruction, c, span, scored) for c in chunks])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert len(set(got.tolist())) == len(chunks)  # the scores tell chunks apart


def test_draft_is_greedy_denoising_without_context():
    lm = tiny_lm("llada")
    question = ids(6, 7)
    draft = draft_answer(lm, question, None, tokens=4, rounds=3)
    assert all(draft.confirmed) and lm.spec.mask_token_id not in draft.tokens
    # the first slot is the argmax of one forward over [BOS, question, 4 masks]
    x = torch.tensor([[lm.spec.bos_token_id] + question + [lm.spec.mask_token_id] * 4])
    logits = lm.model(x).logits[0]
    assert draft.tokens[0] == int(logits[1 + len(question)].argmax())
    assert draft_answer(lm, question, None, tokens=0, rounds=1).tokens == []


def test_rotate_keys_moves_positions():
    lm = tiny_lm("llada")
    k = torch.randn(3, lm.spec.head_dim)
    rot = lm.model.rotary

    def at(x, p):
        cos, sin = rot.cos_sin(torch.tensor([[p]]), torch.float32)
        return apply_rotary(x, cos[0, 0, 0], sin[0, 0, 0])

    base = torch.stack([at(k[i], i) for i in range(3)])
    want = torch.stack([at(k[i], i + 5) for i in range(3)])
    torch.testing.assert_close(rotate_keys(base, 5, rot), want, rtol=1e-5, atol=1e-5)


def test_rank_by_draft_finds_the_chunk_that_repeats_the_question():
    """A chunk holding the question's own tokens makes the question most probable under any model that copies;
    with random weights we only check the ranking is the top-K of the scores, in document order."""
    lm = tiny_lm("dream", 2)
    cfg = MethodConfig(chunk_size=16, top_k=2, scoring="draft")
    chunks = [ids(16, i) for i in range(5)]
    kvs = encode_chunks(lm, chunks, cfg, lm.model_id)
    picked, stats = rank_by_draft(lm, ids(6, 9), kvs, 2, None, cfg)
    assert len(picked) == 2 and picked == sorted(picked) and len(stats["draft_tokens"]) == 2


def test_instruction_kv_is_cached_by_content():
    lm = tiny_lm("llada")
    cache = ChunkCache()
    a = instruction_kv(lm, ids(8, 1), cache, lm.model_id)
    assert instruction_kv(lm, ids(8, 1), cache, lm.model_id) is a and len(cache) == 1
    assert instruction_kv(lm, [], cache, lm.model_id) is None
    assert a.chunk_id == instruction_id(lm.model_id, ids(8, 1)) and a.length == 9  # BOS + 8 tokens


def test_bad_scoring_input_is_rejected():
    with pytest.raises(InvalidRequest, match="scoring"):
        MethodConfig(scoring="bm25").validate()
    with pytest.raises(InvalidRequest, match="selected_kv"):
        MethodConfig(selected_kv="both").validate()
    with pytest.raises(InvalidRequest, match="draft_tokens"):
        MethodConfig(draft_tokens=-1).validate()
    lm = tiny_lm("llada")
    with pytest.raises(InvalidRequest, match="scored"):
        draft_chunk_scores(lm, [], [1, 2], [True], None)
