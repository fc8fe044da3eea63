"""Generation in one process: a request, a mode, the denoising loop, the answer and its statistics.

Modes are Denoisers (see sampler.py). `vanilla` re-encodes BOS + context + question + block at every step: the
reference that every faster mode is compared with.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from pdllm.models.loader import LoadedModel
from pdllm.models.transformer import DllmModel
from pdllm.prompt import DEFAULT_MAX_CONTEXT_TOKENS, EncodedRequest, encode_request
from pdllm.sampler import SamplerConfig, denoise, strip_after_eos

MODES = ("vanilla",)


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
    return torch.tensor([bos + req.context_ids + req.question_ids], device=lm.model.device)


def generate(
    lm: LoadedModel,
    context: str,
    question: str,
    sampler: SamplerConfig | None = None,
    mode: str = "vanilla",
    max_context_tokens: int = DEFAULT_MAX_CONTEXT_TOKENS,
    seed: int = 0,
    on_step: Callable[[int, Tensor], None] | None = None,
) -> GenerationOutput:
    """`on_step(step, gen)` sees the generated tokens after every denoising step (streaming); raising stops it."""
    sampler = sampler or SamplerConfig()
    sampler.validate()
    req = encode_request(lm.tokenizer, context, question, max_context_tokens)
    t0 = time.perf_counter()
    if mode != "vanilla":
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    denoiser = VanillaDenoiser(lm.model, prompt_tensor(lm, req))
    gen = torch.Generator(device=lm.model.device).manual_seed(seed)
    result = denoise(
        denoiser, 1, sampler, lm.spec.mask_token_id, lm.spec.eos_token_ids, lm.model.device, gen, on_step=on_step
    )
    tokens = strip_after_eos(result.tokens[0].tolist(), lm.spec.eos_token_ids, lm.spec.mask_token_id)
    stats = {
        "mode": mode,
        "context_tokens": len(req.context_ids),
        "question_tokens": len(req.question_ids),
        "steps": result.steps,
        "generated_tokens": len(tokens),
        "decode_seconds": round(sum(result.step_seconds), 4),
        "mean_step_ms": round(1000 * sum(result.step_seconds) / max(result.steps, 1), 3),
        "total_seconds": round(time.perf_counter() - t0, 4),
    }
    return GenerationOutput(answer=lm.tokenizer.decode(tokens), tokens=tokens, stats=stats)
