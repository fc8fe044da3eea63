"""Chunk ranking and token selection on a model whose scores are known by construction; bad input; the three modes
through engine.generate and `pdllm generate`."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pdllm.cli import main
from pdllm.engine import generate
from pdllm.errors import InvalidRequest
from pdllm.method import (
    ChunkCache,
    MethodConfig,
    chunk_context,
    chunk_id,
    chunk_scores,
    encode_chunks,
    rank_chunks,
    split_chunks,
)
from pdllm.method.selection import question_queries, select_tokens
from pdllm.models.loader import LoadedModel, load_model
from pdllm.models.tiny import tiny_spec
from pdllm.models.transformer import DllmModel
from pdllm.sampler import SamplerConfig

NEEDLE, QTOK, HIDDEN, HEADS, HEAD_DIM, DIM = 200, 201, 64, 4, 16, 7  # DIM: the head dim carrying the signal
A, B = 0.5, 0.75  # key and query weights on the signal


def needle_lm() -> LoadedModel:
    """One layer; only the NEEDLE token has a key along head dim DIM and only QTOK a query along it, so a chunk's
    score is known in closed form. RoPE theta 1e9 makes that dim pair (7, 15) rotate by < 1e-5 rad over the test's
    positions, so token scores are (nearly) position-free as well."""
    spec = replace(tiny_spec("llada", hidden=HIDDEN, layers=1, heads=HEADS), rope_theta=1e9)
    model = DllmModel(spec).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for n in (model.layers[0].attn_norm, model.layers[0].mlp_norm, model.norm):
            n.weight.fill_(1.0)
        model.embed.weight[:, 2:] = torch.randn(spec.vocab_size, HIDDEN - 2, generator=g)
        model.embed.weight[NEEDLE] = 0.0
        model.embed.weight[NEEDLE, 0] = 10.0
        model.embed.weight[QTOK] = 0.0
        model.embed.weight[QTOK, 1] = 10.0
        for h in range(HEADS):
            model.layers[0].k_proj.weight[h * HEAD_DIM + DIM, 0] = A
            model.layers[0].q_proj.weight[h * HEAD_DIM + DIM, 1] = B
        model.layers[0].v_proj.weight.normal_(0, 0.1, generator=g)
        model.lm_head.weight.normal_(0, 0.1, generator=g)
    return LoadedModel(model, None, spec, Path("."), "needle")


def normed(x: float = 10.0, eps: float = 1e-5) -> float:
    """The RMSNorm output of an embedding with a single non-zero entry x (hidden size HIDDEN)."""
    return x / math.sqrt(x * x / HIDDEN + eps)


def haystack(n_chunks: int, size: int, needle_at: int, offset: int) -> list[int]:
    ctx = torch.randint(0, 190, (n_chunks * size,), generator=torch.Generator().manual_seed(needle_at)).tolist()
    ctx[needle_at * size + offset] = NEEDLE
    return ctx


@pytest.mark.parametrize("needle_at,offset", [(0, 0), (5, 17), (7, 31)])
def test_ranking_finds_the_needle_chunk_with_the_known_score(needle_at, offset):
    lm = needle_lm()
    cfg = MethodConfig(chunk_size=32)
    kvs = encode_chunks(lm, split_chunks(haystack(8, 32, needle_at, offset), 32), cfg, "needle")
    question = [QTOK] * 5
    scores = chunk_scores(lm, question, [c.summary for c in kvs])
    # mean over layers (1) and question tokens, sum over heads of q . mean(k) / sqrt(head_dim)
    expected = HEADS * (B * normed()) * (A * normed() / 32) / math.sqrt(HEAD_DIM)
    assert scores[needle_at].item() == pytest.approx(expected, rel=2e-3)
    others = torch.cat([scores[:needle_at], scores[needle_at + 1 :]])
    assert others.abs().max().item() < 1e-4
    assert rank_chunks(lm, question, [c.summary for c in kvs], 1) == [needle_at]
    top3 = rank_chunks(lm, question, [c.summary for c in kvs], 3)
    assert needle_at in top3 and top3 == sorted(top3)
    assert rank_chunks(lm, question, [c.summary for c in kvs], 50) == list(range(8))  # K > N: every chunk


def test_token_selection_keeps_the_needle_and_bos_in_every_layer_and_head():
    lm = needle_lm()
    cfg = MethodConfig(chunk_size=32, keep_ratio=0.25)
    kvs = encode_chunks(lm, split_chunks(haystack(4, 32, 2, 20), 32), cfg, "needle")
    spec = lm.spec
    s = max(c.length for c in kvs)
    keys = torch.zeros(len(kvs), spec.num_kv_heads, s, spec.head_dim)  # slot i = chunk i (the layout select reads)
    for i, c in enumerate(kvs):
        keys[i, :, : c.length] = c.k[0]
    q = question_queries(lm, [QTOK] * 5, start=33).q
    sel = select_tokens(q, [keys], [c.length for c in kvs], [c.has_bos for c in kvs], 0.25)[0]
    per_chunk = 1 + math.ceil(0.25 * 32)
    assert sel.shape == (HEADS, 4 * per_chunk)
    for h in range(HEADS):
        rows = set(sel[h].tolist())
        assert {i * s for i in range(4)} <= rows  # every chunk's BOS anchor
        assert 2 * s + 1 + 20 in rows  # the needle (row 0 is BOS)
        assert set(range(2 * s + 1 + 17, 2 * s + 1 + 24)) <= rows  # and its max-pooled neighbourhood
        assert len(rows) == 4 * per_chunk


def test_chunking_and_ids():
    assert split_chunks(list(range(40)), 16) == [list(range(16)), list(range(16, 32)), list(range(32, 40))]
    assert split_chunks([], 16) == []
    a = chunk_id("m", [1, 2, 3], 16, True)
    assert len(a) == 64 and a == chunk_id("m", [1, 2, 3], 16, True)
    assert (
        len(
            {
                a,
                chunk_id("m2", [1, 2, 3], 16, True),
                chunk_id("m", [1, 2, 4], 16, True),
                chunk_id("m", [1, 2, 3], 32, True),
                chunk_id("m", [1, 2, 3], 16, False),
            }
        )
        == 5
    )


@pytest.mark.parametrize(
    "kw,msg",
    [
        ({"top_k": 0}, "top_k"),
        ({"chunk_size": 15}, "chunk_size must be >= 16"),
        ({"chunk_size": 9000}, "exceeds the model's maximum length 8192"),
        ({"keep_ratio": 0.0}, "keep_ratio"),
        ({"keep_ratio": 1.01}, "keep_ratio"),
    ],
)
def test_bad_method_config_is_rejected_with_one_line(kw, msg):
    with pytest.raises(InvalidRequest, match=msg):
        MethodConfig(**kw).validate(8192)


@pytest.fixture(scope="module")
def tiny(tiny_llada):
    return load_model(tiny_llada)


def test_engine_three_modes_and_sparse_stats(tiny):
    context = "The pass key is 71432. Remember it. " * 6
    sampler = SamplerConfig(gen_length=16, block_length=16, steps=8)
    for mode in ("vanilla", "prefix"):
        out = generate(tiny, context, "What is the pass key?", sampler, mode)
        assert out.stats["mode"] == mode and out.stats["steps"] >= 1
    cache = ChunkCache()
    cfg = MethodConfig(chunk_size=32, top_k=100, keep_ratio=0.5)
    out = generate(tiny, context, "What is the pass key?", sampler, "sparse", method=cfg, cache=cache)
    st = out.stats
    n = len(chunk_context(tiny.tokenizer, tiny.tokenizer(context, add_special_tokens=False).input_ids, cfg))
    assert n > math.ceil(len(context.encode()) / 32)  # text borders: chunks end before the size
    assert st["chunks"] == n and st["prefill_chunks"] + st["reused_chunks"] == n
    assert st["top_k_clamped"] is True and st["top_k_used"] == st["selected_chunks"] == n
    assert st["selected_tokens"] < n * 33 and st["steps"] == 8 and st["mean_step_ms"] > 0
    again = generate(tiny, context, "And the key?", sampler, "sparse", method=cfg, cache=cache).stats
    assert again["prefill_chunks"] == 0 and again["reused_chunks"] == n
    with pytest.raises(InvalidRequest, match="unknown mode"):
        generate(tiny, context, "q?", sampler, "dense")
    with pytest.raises(InvalidRequest, match="top_k"):
        generate(tiny, context, "q?", sampler, "sparse", method=MethodConfig(top_k=0))


@pytest.mark.parametrize("mode", ["prefix", "sparse"])
def test_generate_cli_modes(mode, tiny_llada, capsys):
    argv = [
        "generate",
        "--in-process",
        "--model",
        str(tiny_llada),
        "--context",
        "The pass key is 71432. " * 4,
        "--question",
        "Key?",
        "--mode",
        mode,
        "--chunk-size",
        "16",
        "--top-k",
        "2",
        "--keep-ratio",
        "0.5",
        "--gen-length",
        "8",
        "--block-length",
        "8",
        "--steps",
        "4",
        "--device",
        "cpu",
        "--json",
    ]
    assert main(argv) == 0
    stats = json.loads(capsys.readouterr().out)["stats"]
    assert stats["mode"] == mode and stats["steps"] >= 1
    if mode == "sparse":
        keys = ("prefill_chunks", "reused_chunks", "selected_chunks", "selected_tokens", "mean_step_ms")
        assert all(k in stats for k in keys) and stats["selected_chunks"] == 2


def test_generate_cli_bad_method_flag_exits_2(tiny_llada, capsys):
    argv = [
        "generate",
        "--in-process",
        "--model",
        str(tiny_llada),
        "--context",
        "x",
        "--question",
        "q",
        "--mode",
        "sparse",
        "--chunk-size",
        "8",
        "--device",
        "cpu",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pdllm: error: --chunk-size must be >= 16") and "\n" not in err
