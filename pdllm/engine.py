"""Generation in one process: a request, a mode, the denoising loop, the answer and its statistics.

Modes are Denoisers (see sampler.py). `vanilla` re-encodes BOS + context + question + block at every step: the
reference that every faster mode is compared with. `prefix` encodes BOS + context once and attends to all of it
(Fast-dLLM style). `sparse` is predictive prefilling (pdllm.method): chunks encoded once each (and cached across
requests), the top-K chunks and their most relevant tokens selected per question, the block denoised against them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from pdllm.errors import InvalidRequest
from pdllm.method import ChunkCache, MethodConfig, decode_with_chunks, split_chunks
from pdllm.method.instruction import instruction_kv
from pdllm.method.joint import decode_joint
from pdllm.method.prefix import PrefixDenoiser, encode_prefix
from pdllm.method.ranking import rank
from pdllm.models.loader import LoadedModel
from pdllm.models.transformer import DllmModel
from pdllm.prompt import DEFAULT_MAX_CONTEXT_TOKENS, QUESTION_TEMPLATE, EncodedRequest, encode_request
from pdllm.sampler import SamplerConfig, denoise, strip_after_eos

MODES = ("vanilla", "prefix", "sparse")
DEFAULT_CHUNK_CACHE = ChunkCache()  # process-wide: a chunk seen by any request is not encoded again

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
    instruction: str = "",
    question_template: str = QUESTION_TEMPLATE,
) -> GenerationOutput:
    """`on_step(step, gen)` sees the generated tokens after every denoising step (streaming); raising stops it.
    `method` configures prefix/sparse (chunking, top-K, keep ratio, BOS anchor, scoring, selected KV); `cache`
    defaults to the process's. `instruction` is kept whole before the context in every mode (prompt.py)."""
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
    if mode == "sparse":
        raw, more = sparse_tokens(lm, req, sampler, method, seed, on_step, cache or DEFAULT_CHUNK_CACHE)
        stats.update(more)
    else:
        if mode == "vanilla":
            denoiser = VanillaDenoiser(lm.model, prompt_tensor(lm, req))
        else:
            bos = [lm.spec.bos_token_id] if method.use_bos and lm.spec.bos_token_id is not None else []
            t_prefill = time.perf_counter()
            prefix = bos + req.instruction_ids + req.context_ids
            kv = encode_prefix(lm.model, prefix)
            stats["prefill_seconds"] = round(time.perf_counter() - t_prefill, 4)
            stats["kv_tokens_per_step"] = len(prefix) + len(req.question_ids) + sampler.gen_length
            denoiser = PrefixDenoiser(lm.model, kv, torch.tensor([req.question_ids], device=lm.model.device))
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
    tokens = strip_after_eos(raw, lm.spec.eos_token_ids, lm.spec.mask_token_id)
    stats["generated_tokens"] = len(tokens)
    stats["total_seconds"] = round(time.perf_counter() - t0, 4)
    return GenerationOutput(answer=lm.tokenizer.decode(tokens), tokens=tokens, stats=stats)


def sparse_tokens(
    lm: LoadedModel,
    req: EncodedRequest,
    sampler: SamplerConfig,
    method: MethodConfig,
    seed: int,
    on_step: Callable[[int, Tensor], None] | None,
    cache: ChunkCache,
) -> tuple[list[int], dict]:
    """Chunk (cached), rank, select, denoise; returns the raw generated tokens and the method's statistics."""
    t0 = time.perf_counter()
    chunks = split_chunks(req.context_ids, method.chunk_size)
    found = cache.get_or_encode(lm, chunks, method, lm.model_id)
    instruction = instruction_kv(lm, req.instruction_ids, cache, lm.model_id)
    t1 = time.perf_counter()
    picked, rank_stats = rank(lm, req.question_ids, found.chunks, method, instruction)
    t2 = time.perf_counter()
    if method.selected_kv == "joint":
        result = decode_joint(
            lm, req.question_ids, [chunks[i] for i in picked], method, sampler, req.instruction_ids, seed, on_step
        )
    else:
        selected = [found.chunks[i] for i in picked]
        result = decode_with_chunks(
            lm, req.question_ids, selected, method, sampler, seed=seed, on_step=on_step, instruction=instruction
        )
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
        "keep_ratio": method.keep_ratio,
        "use_bos": method.use_bos,
        "selected_kv": method.selected_kv,
        **rank_stats,
        **result.stats,
    }
    return result.tokens, stats
