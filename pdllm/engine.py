"""Generation in one process: a request, a mode, the denoising loop, the answer and its statistics.

`vanilla` re-encodes BOS + context + question + block at every step (pdllm.sampler.denoise over a Denoiser): the
reference that every faster mode is compared with. `prefix` (Fast-dLLM style: BOS + context encoded once and
attended in full) and `sparse` (predictive prefilling: chunks encoded once each and cached across requests, the top-K
chunks and their most relevant tokens selected per question) run on the decode engine of `pdllm.decode_node`, the
same batched engine a decode actor runs, with this one request as its batch: the prefix is a single pool entry read
whole, the chunks are pool entries read through their selected rows.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from pdllm.decode_node.engine import DecodeEngine, EngineConfig, instruction_first
from pdllm.errors import InvalidRequest
from pdllm.method import ChunkCache, MethodConfig, chunk_context, chunk_id
from pdllm.method.chunk_kv import ChunkKV
from pdllm.method.instruction import instruction_kv
from pdllm.method.joint import decode_joint
from pdllm.method.prefix import encode_prefix
from pdllm.method.ranking import rank
from pdllm.models.loader import LoadedModel
from pdllm.models.transformer import DllmModel
from pdllm.prompt import DEFAULT_MAX_CONTEXT_TOKENS, QUESTION_TEMPLATE, EncodedRequest, encode_request
from pdllm.sampler import SamplerConfig, denoise, strip_after_eos

MODES = ("vanilla", "prefix", "sparse")
DEFAULT_CHUNK_CACHE = ChunkCache()  # process-wide: a chunk (or prefix) seen by any request is not encoded again
_ENGINE_ATTR = "_pdllm_decode_engine"  # where a model keeps its engine: the two live and die together
_ENGINES_LOCK = threading.Lock()


def engine_for(lm: LoadedModel, config: EngineConfig | None = None) -> DecodeEngine:
    """The process's decode engine for `lm` (made on first use; `config` applies then only).

    The model holds its engine, not a process-wide table: a table would keep every model it ever saw alive, with
    its engine's pool (1 GiB on CPU), after its owner dropped the model. A model and its engine are freed together
    once neither is referenced; `release_engine` frees the engine at once. (Every live engine is stopped at exit by
    pdllm.decode_node.engine.)"""
    with _ENGINES_LOCK:
        engine = lm.model.__dict__.get(_ENGINE_ATTR)
        if engine is None:
            engine = lm.model.__dict__[_ENGINE_ATTR] = DecodeEngine(lm, config)
        return engine


def release_engine(lm: LoadedModel) -> None:
    """Stop and forget the decode engine of `lm`'s model, so its pool's memory is freed now (a later engine_for
    makes a new one)."""
    with _ENGINES_LOCK:
        engine = lm.model.__dict__.pop(_ENGINE_ATTR, None)
    if engine is not None:
        engine.close()


__all__ = ["MODES", "GenerationOutput", "MethodConfig", "generate"]


class VanillaDenoiser:
    """Full recompute: the whole prompt and the generated block pass through the model at every step."""

    def __init__(self, model: DllmModel, prompt: Tensor) -> None:
        self.model, self.prompt = model, prompt

    @torch.no_grad()
    def logits(self, gen: Tensor) -> Tensor:
        p = self.prompt.shape[1]
        x = torch.cat([self.prompt.expand(gen.shape[0], -1), gen], dim=1)
        start = p - 1 if self.model.spec.shift_logits else p
        out = self.model(x, logits_from=start)
        return self.model.token_logits(out.logits, p - start, gen.shape[1])


@dataclass
class GenerationOutput:
    answer: str
    tokens: list[int]
    stats: dict = field(default_factory=dict)


def prompt_tensor(lm: LoadedModel, req: EncodedRequest) -> Tensor:
    bos = [lm.spec.bos_token_id] if lm.spec.bos_token_id is not None else []
    return torch.tensor([bos + req.instruction_ids + req.context_ids + req.question_ids], device=lm.model.device)


def generate(
    lm: LoadedModel,
    context: str,
    question: str,
    sampler: SamplerConfig | None = None,
    mode: str = "vanilla",
    max_context_tokens: int = DEFAULT_MAX_CONTEXT_TOKENS,
    seed: int = 0,
    on_step: Callable[[int, Tensor], None] | None = None,
    method: MethodConfig | None = None,
    cache: ChunkCache | None = None,
    engine: DecodeEngine | None = None,
    instruction: str = "",
    question_template: str = QUESTION_TEMPLATE,
) -> GenerationOutput:
    """`on_step(step, gen)` sees the generated tokens after every denoising step (streaming); raising stops it.
    `method` configures prefix/sparse (chunking, top-K, keep ratio, BOS anchor, scoring, selected KV); `cache`
    (prefill's chunk cache) defaults to the process's; `engine` (the decode engine) to the process's engine for
    `lm`. `instruction` is kept whole before the context in every mode (prompt.py)."""
    sampler = sampler or SamplerConfig()
    sampler.validate()
    if mode not in MODES:
        raise InvalidRequest(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    method = method or MethodConfig()
    if mode != "vanilla":
        method.validate(lm.spec.max_position)
    req = encode_request(lm.tokenizer, context, question, max_context_tokens, instruction, question_template)
    t0 = time.perf_counter()
    stats: dict = {"mode": mode, "context_tokens": len(req.context_ids), "question_tokens": len(req.question_ids)}
    stats["instruction_tokens"] = len(req.instruction_ids)
    cache = cache if cache is not None else DEFAULT_CHUNK_CACHE
    if mode == "vanilla":
        denoiser = VanillaDenoiser(lm.model, prompt_tensor(lm, req))
        gen = torch.Generator(device=lm.model.device).manual_seed(seed)
        result = denoise(
            denoiser, 1, sampler, lm.spec.mask_token_id, lm.spec.eos_token_ids, lm.model.device, gen, on_step=on_step
        )
        raw = result.tokens[0].tolist()
        stats.update(
            steps=result.steps,
            decode_seconds=round(sum(result.step_seconds), 4),
            mean_step_ms=round(1000 * sum(result.step_seconds) / max(result.steps, 1), 3),
        )
    else:
        engine = engine or engine_for(lm)
        run = prefix_tokens if mode == "prefix" else sparse_tokens
        raw, more = run(lm, req, sampler, method, seed, on_step, cache, engine)
        stats.update(more)
    tokens = strip_after_eos(raw, lm.spec.eos_token_ids, lm.spec.mask_token_id)
    stats["generated_tokens"] = len(tokens)
    stats["total_seconds"] = round(time.perf_counter() - t0, 4)
    return GenerationOutput(answer=lm.tokenizer.decode(tokens), tokens=tokens, stats=stats)


def prefix_kv(lm: LoadedModel, req: EncodedRequest, method: MethodConfig, cache: ChunkCache) -> tuple[ChunkKV, bool]:
    """[BOS] + instruction + context as one cache entry (encoded once per document); True if it was encoded now."""
    bos = [lm.spec.bos_token_id] if method.use_bos and lm.spec.bos_token_id is not None else []
    tokens = req.instruction_ids + req.context_ids
    cid = chunk_id(lm.model_id, tokens, 0, bool(bos))  # chunk size 0: the whole-prompt entry
    entry = cache.get(cid)
    if entry is not None:
        return entry, False
    kv = encode_prefix(lm.model, bos + tokens)
    k = torch.stack([k[0] for k, _ in kv])
    v = torch.stack([v[0] for _, v in kv])
    entry = ChunkKV(cid, tokens, k, v, torch.zeros(0), bool(bos))
    cache.put(entry)
    return entry, True


def prefix_tokens(
    lm: LoadedModel,
    req: EncodedRequest,
    sampler: SamplerConfig,
    method: MethodConfig,
    seed: int,
    on_step: Callable[[int, Tensor], None] | None,
    cache: ChunkCache,
    engine: DecodeEngine,
) -> tuple[list[int], dict]:
    """The prefix-cache baseline on the decode engine: the question attends to every context row."""
    t0 = time.perf_counter()
    entry, encoded = prefix_kv(lm, req, method, cache)
    t1 = time.perf_counter()
    whole = MethodConfig(**{**method.__dict__, "keep_ratio": 1.0})
    result, sel = engine.run(
        req.question_ids, [entry.chunk_id], lambda _: {entry.chunk_id: entry}, whole, sampler, seed, on_step
    )
    return result.tokens, {
        "prefill_seconds": round(t1 - t0, 4),
        "prefix_encoded": encoded,
        "kv_tokens_per_step": sel["kv_tokens_per_step"],
        "question_start_position": sel["question_start_position"],
        **result.stats,
    }


def sparse_tokens(
    lm: LoadedModel,
    req: EncodedRequest,
    sampler: SamplerConfig,
    method: MethodConfig,
    seed: int,
    on_step: Callable[[int, Tensor], None] | None,
    cache: ChunkCache,
    engine: DecodeEngine,
) -> tuple[list[int], dict]:
    """Chunk (cached), rank, select, denoise on the engine; returns the raw generated tokens and the statistics."""
    t0 = time.perf_counter()
    chunks = chunk_context(lm.tokenizer, req.context_ids, method)
    found = cache.get_or_encode(lm, chunks, method, lm.model_id)
    instruction = instruction_kv(lm, req.instruction_ids, cache, lm.model_id)
    t1 = time.perf_counter()
    if method.scoring == "summary":  # batched with the other requests ranking now (decode_node.ranker)
        picked = engine.rank_chunks(req.question_ids, [c.summary for c in found.chunks], method.top_k)
        rank_stats = {"scoring": "summary"}
    else:
        with engine.scheduler.gpu_lock:
            picked, rank_stats = rank(lm, req.question_ids, found.chunks, method, instruction)
    t2 = time.perf_counter()
    if method.selected_kv == "joint":  # one request at a time, beside the engine (not batched yet)
        with engine.scheduler.gpu_lock:
            result = decode_joint(
                lm, req.question_ids, [chunks[i] for i in picked], method, sampler, req.instruction_ids, seed, on_step
            )
        result_stats, sel = result.stats, {}
    else:
        selected = {found.chunks[i].chunk_id: found.chunks[i] for i in picked}
        if instruction is not None:
            selected[instruction.chunk_id] = instruction
        cids, whole = instruction_first([found.chunks[i].chunk_id for i in picked], instruction)
        result, sel = engine.run(
            req.question_ids, cids, lambda need: {c: selected[c] for c in need}, method, sampler, seed, on_step,
            whole=whole,
        )  # fmt: skip
        sel["selected_chunks"] = len(picked)
        result_stats = result.stats
    stats = {
        "chunks": len(chunks),
        "prefill_chunks": found.encoded,
        "reused_chunks": found.reused,
        "prefill_seconds": round(t1 - t0, 4),
        "rank_ms": round(1000 * (t2 - t1), 3),
        "top_k": method.top_k,
        "top_k_used": len(picked),
        "top_k_clamped": method.top_k > len(chunks),
        "selected_chunk_indices": picked,
        "chunk_size": method.chunk_size,
        "chunking": method.chunking,
        "keep_ratio": method.keep_ratio,
        "use_bos": method.use_bos,
        "context_tokens_selected": sum(len(found.chunks[i].tokens) for i in picked),
        "selected_kv": method.selected_kv,
        **rank_stats,
        **sel,
        **result_stats,
    }
    return result.tokens, stats
