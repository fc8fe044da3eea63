"""Semantics of predictive prefilling that must hold exactly: chunked prefill, mode equivalences, keep_question_kv.

What is exactly equal under bidirectional attention (and what these tests prove):
* sparse with one chunk kept whole (K = N = 1, keep ratio 1, no BOS) lays out the same keys at the same positions
  as prefix mode without BOS, so their logits agree at every step;
* prefix vs vanilla: in vanilla the context tokens also attend to question + block, so from layer 1 on their K/V
  differ from the prefix cache's; only layer 0's context K/V agree (they depend on embeddings and positions alone).
  Hence first-step logits agree for a one-layer model, and for deeper models they agree with a vanilla forward in
  which context rows are masked from question/block columns (which is what a prefix cache computes), and not with
  plain vanilla (checked, so the comparison can tell the two apart).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pdllm.decode_node.engine import DecodeEngine, EngineConfig

from pdllm.engine import VanillaDenoiser
from pdllm.method import ChunkCache, MethodConfig, encode_chunks, split_chunks
from pdllm.method.chunks import chunk_id
from pdllm.method.prefix import PrefixDenoiser, encode_prefix
from pdllm.models.loader import LoadedModel
from pdllm.models.tiny import random_model, tiny_spec
from pdllm.sampler import SamplerConfig, denoise


def tiny_lm(family: str = "llada", layers: int = 2, kv_heads: int | None = None, seed: int = 0) -> LoadedModel:
    spec = tiny_spec(family, layers=layers, kv_heads=kv_heads)
    return LoadedModel(random_model(spec, seed), None, spec, Path("."), f"tiny-{family}-{layers}-{seed}")


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 250, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def masked_gen(lm: LoadedModel, g: int = 8) -> torch.Tensor:
    gen = torch.full((1, g), lm.spec.mask_token_id)
    gen[0, 2] = 65  # one unmasked token, so not every block position looks alike
    return gen


def engine_answer(lm, question, kvs, cfg, sampler) -> list[int]:
    """The decode engine's tokens for one job over `kvs` (every row of every chunk, or cfg.keep_ratio of them)."""
    engine = DecodeEngine(lm, EngineConfig(max_batch=2, pool_bytes=4 << 20, page_rows=8, max_span=64, max_selected=256))
    by_id = {c.chunk_id: c for c in kvs}
    job = engine.prepare(question, list(by_id), lambda need: {c: by_id[c] for c in need}, cfg, sampler)
    handle = engine.scheduler.submit(job)
    while not handle.done.is_set():
        engine.scheduler.step()
    return handle.wait().tokens


@pytest.mark.parametrize("family,kv_heads", [("llada", None), ("dream", 2)])
def test_sparse_whole_single_chunk_equals_prefix(family, kv_heads):
    lm = tiny_lm(family, kv_heads=kv_heads)
    context, question = ids(40, 1), ids(7, 2)
    cfg = MethodConfig(chunk_size=64, top_k=1, keep_ratio=1.0, use_bos=False)
    kvs = encode_chunks(lm, split_chunks(context, cfg.chunk_size), cfg, lm.model_id)
    assert len(kvs) == 1 and not kvs[0].has_bos
    prefix = PrefixDenoiser(lm.model, encode_prefix(lm.model, context), torch.tensor([question]))
    # the engine's sparse answer over the one chunk equals the dense prefix-cache reference's
    sampler = SamplerConfig(gen_length=8, block_length=8, steps=8)
    a = engine_answer(lm, question, kvs, cfg, sampler)
    b = denoise(prefix, 1, sampler, lm.spec.mask_token_id, lm.spec.eos_token_ids).tokens[0].tolist()
    assert a == b


def test_chunk_kv_equals_encoding_bos_plus_chunk_alone_despite_batch_padding():
    lm = tiny_lm("dream", kv_heads=2)
    cfg = MethodConfig(chunk_size=16)
    context = ids(16 * 3 + 5, 3)  # the short last chunk is padded inside its batch
    kvs = encode_chunks(lm, split_chunks(context, 16), cfg, lm.model_id, batch_size=4)
    assert [c.length for c in kvs] == [17, 17, 17, 6] and all(c.has_bos for c in kvs)
    for c in kvs:
        alone = lm.model(torch.tensor([[lm.spec.bos_token_id] + c.tokens]), return_kv=True, logits_from=None).kv
        torch.testing.assert_close(c.k, torch.stack([k[0] for k, _ in alone]), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(c.v, torch.stack([v[0] for _, v in alone]), rtol=1e-5, atol=1e-5)
        assert c.summary.numel() * c.summary.element_size() < 4096


def test_uneven_chunks_batch_by_length_and_come_back_in_order(monkeypatch):
    lm = tiny_lm("llada")
    cfg = MethodConfig(chunk_size=16)
    lengths = [16, 5, 15, 6, 16, 4, 14, 7]  # a text cut's uneven chunks, long and short interleaved
    chunks = [ids(n, 10 + i) for i, n in enumerate(lengths)]
    widths = []
    forward = lm.model.forward
    monkeypatch.setattr(lm.model, "forward", lambda x, **kw: widths.append(x.shape[1]) or forward(x, **kw))
    kvs = encode_chunks(lm, chunks, cfg, lm.model_id, batch_size=4)
    assert widths == [1 + 7, 1 + 16]  # the four shortest, then the four longest: 9 pad positions, not 45
    assert [c.tokens for c in kvs] == chunks
    assert [c.chunk_id for c in kvs] == [chunk_id(lm.model_id, c, 16, True) for c in chunks]
    for c in kvs:
        alone = forward(torch.tensor([[lm.spec.bos_token_id] + c.tokens]), return_kv=True, logits_from=None).kv
        torch.testing.assert_close(c.k, torch.stack([k[0] for k, _ in alone]), rtol=1e-5, atol=1e-5)


class ContextBlindToQuestion:
    """Vanilla forward in which context rows (the first P) may not attend to question/block columns."""

    def __init__(self, p: int) -> None:
        self.p = p

    def attend(self, layer, q, k, v):
        t = q.shape[2]
        allowed = torch.ones(t, t, dtype=torch.bool)
        allowed[: self.p, self.p :] = False
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, enable_gqa=k.shape[1] != q.shape[1]
        )


@pytest.mark.parametrize("family,kv_heads", [("llada", None), ("dream", 2)])
def test_prefix_equals_vanilla_first_step_where_exactness_holds(family, kv_heads):
    context, question = ids(30, 4), ids(6, 5)
    # one layer: the cached context K/V are layer-0 K/V, identical in both modes -> identical first-step logits
    lm1 = tiny_lm(family, layers=1, kv_heads=kv_heads)
    prompt = torch.tensor([[lm1.spec.bos_token_id] + context + question])
    prefix_ids = [lm1.spec.bos_token_id] + context
    gen = masked_gen(lm1)
    pre = PrefixDenoiser(lm1.model, encode_prefix(lm1.model, prefix_ids), torch.tensor([question])).logits(gen)
    torch.testing.assert_close(pre, VanillaDenoiser(lm1.model, prompt).logits(gen), rtol=1e-5, atol=1e-5)

    # two layers: layer-0 context K/V agree; logits equal vanilla-with-context-blind-to-question, not plain vanilla
    lm2 = tiny_lm(family, layers=2, kv_heads=kv_heads)
    full = torch.cat([prompt, gen], dim=1)
    p = len(prefix_ids)
    cached = encode_prefix(lm2.model, prefix_ids)
    vanilla_kv = lm2.model(full, return_kv=True, logits_from=None).kv
    torch.testing.assert_close(cached[0][0], vanilla_kv[0][0][:, :, :p], rtol=1e-5, atol=1e-5)
    assert (cached[1][0] - vanilla_kv[1][0][:, :, :p]).abs().max() > 1e-3
    pre = PrefixDenoiser(lm2.model, cached, torch.tensor([question])).logits(gen)
    start = full.shape[1] - gen.shape[1]
    shift = 1 if lm2.spec.shift_logits else 0
    blind = lm2.model(full, context=ContextBlindToQuestion(p), logits_from=start - shift).logits
    torch.testing.assert_close(pre, blind[:, : gen.shape[1]], rtol=1e-5, atol=1e-5)
    assert (pre - VanillaDenoiser(lm2.model, prompt).logits(gen)).abs().max() > 1e-3


def test_keep_question_kv_decodes_and_reports():
    from pdllm.engine import generate

    lm = tiny_lm("llada")
    lm = LoadedModel(lm.model, ByteTokenizer(), lm.spec, lm.path, lm.model_id)
    cfg = MethodConfig(chunk_size=16, keep_question_kv=True)
    sampler = SamplerConfig(gen_length=16, block_length=8, steps=8)
    out = generate(lm, "x" * 40, "q?", sampler, "sparse", method=cfg, cache=ChunkCache())
    question = len(lm.tokenizer("\n\nQuestion: q?\nAnswer:").input_ids)
    assert out.stats["steps"] == 8 and out.stats["keep_question_kv"] is True
    assert out.stats["selected_tokens"] == 17 + 17 + 9
    assert out.stats["kv_tokens_per_step"] == 17 + 17 + 9 + question + 16


class ByteTokenizer:
    def __call__(self, text, add_special_tokens=False):
        return type("Enc", (), {"input_ids": list(text.encode())})()

    def decode(self, tokens):
        return bytes(t for t in tokens if t < 256).decode(errors="replace")


def test_chunk_cache_hit_skips_encoding(monkeypatch):
    lm = tiny_lm("llada")
    calls = []
    forward = lm.model.forward
    monkeypatch.setattr(lm.model, "forward", lambda *a, **kw: calls.append(a[0].shape) or forward(*a, **kw))
    cache = ChunkCache()
    cfg = MethodConfig(chunk_size=16)
    doc = [ids(16, 20 + i) for i in range(5)]
    first = cache.get_or_encode(lm, doc, cfg, lm.model_id)
    assert (first.encoded, first.reused, len(calls)) == (5, 0, 1)  # one batched pass of 5 chunks
    again = cache.get_or_encode(lm, doc, cfg, lm.model_id)
    assert (again.encoded, again.reused, len(calls)) == (0, 5, 1)
    assert all(a is b for a, b in zip(again.chunks, first.chunks, strict=True))
    # another document sharing two chunks encodes only its new ones; other chunking params never match
    mixed = cache.get_or_encode(lm, [doc[1], ids(16, 99), doc[3]], cfg, lm.model_id)
    assert (mixed.encoded, mixed.reused, len(calls)) == (1, 2, 2) and calls[-1][0] == 1
    nobos = cache.get_or_encode(lm, doc[:2], MethodConfig(chunk_size=16, use_bos=False), lm.model_id)
    assert nobos.encoded == 2 and not nobos.chunks[0].has_bos


def test_chunk_cache_encodes_a_document_asked_about_at_once_only_once(monkeypatch):
    """Requests served side by side (serve --in-process) on a new document: one of them encodes it, the others
    wait for that encode and reuse its chunks, and every request gets the same KV objects."""
    import threading

    lm = tiny_lm("llada")
    calls = []
    forward = lm.model.forward
    monkeypatch.setattr(lm.model, "forward", lambda *a, **kw: calls.append(a[0].shape) or forward(*a, **kw))
    cache, cfg = ChunkCache(), MethodConfig(chunk_size=16)
    doc = [ids(16, 40 + i) for i in range(5)]
    start, results = threading.Barrier(4), [None] * 4

    def ask(i: int) -> None:
        start.wait(timeout=30)
        results[i] = cache.get_or_encode(lm, doc, cfg, lm.model_id)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert all(r is not None for r in results)
    assert sum(r.encoded for r in results) == 5 and len(calls) == 1
    assert sorted(r.reused for r in results) == [0, 5, 5, 5]
    assert all(a is b for r in results for a, b in zip(r.chunks, results[0].chunks, strict=True))


@pytest.mark.parametrize("family,kv_heads", [("llada", None), ("dream", 2)])
def test_engine_prefix_mode_equals_the_dense_prefix_reference(family, kv_heads):
    from pdllm.engine import generate

    lm = tiny_lm(family, kv_heads=kv_heads, seed=4)
    lm = LoadedModel(lm.model, ByteTokenizer(), lm.spec, lm.path, lm.model_id)
    context, question = "abcdefghij" * 5, "what?"
    sampler = SamplerConfig(gen_length=16, block_length=8, steps=8)
    out = generate(lm, context, question, sampler, "prefix", cache=ChunkCache())
    q = lm.tokenizer("\n\nQuestion: what?\nAnswer:").input_ids
    prefix = PrefixDenoiser(
        lm.model, encode_prefix(lm.model, [lm.spec.bos_token_id, *context.encode()]), torch.tensor([q])
    )
    ref = denoise(prefix, 1, sampler, lm.spec.mask_token_id, lm.spec.eos_token_ids).tokens[0].tolist()
    from pdllm.sampler import strip_after_eos

    assert out.tokens == strip_after_eos(ref, lm.spec.eos_token_ids, lm.spec.mask_token_id)
    assert out.stats["kv_tokens_per_step"] == 1 + len(context) + len(q) + 16
