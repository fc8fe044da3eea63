"""Joint use of the selected chunks (`selected_kv: joint`, the paper's best LongBench setting).

One bidirectional forward runs [BOS + instruction, (BOS +) each selected chunk, question, masked gen] at continuous
positions 0..L+G-1; its logits make the first denoising decision. The prompt's KV from that forward is then fixed
and every later step recomputes only the generated tokens against it (for shifted-logit models also the prompt's
last token, whose output predicts the first generated token). Unlike `reuse`, the chunks see each other, the
instruction and the question, at the cost of re-encoding the selected chunks once per request.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from pdllm.errors import InvalidRequest
from pdllm.method.config import MethodConfig
from pdllm.models.attention import DenseCachedAttention
from pdllm.models.transformer import DllmModel
from pdllm.sampler import SamplerConfig, denoise


@dataclass
class DecodeResult:
    tokens: list[int]  # generated tokens of the (single) request, masks and end tokens included
    steps: int
    stats: dict = field(default_factory=dict)


class JointDenoiser:
    """A Denoiser (sampler.py): the first call encodes prompt + gen together, later calls only the generated span."""

    def __init__(self, model: DllmModel, prompt: Tensor) -> None:
        self.model, self.prompt = model, prompt
        self.shift = model.spec.shift_logits
        self.kept = prompt.shape[1] - (1 if self.shift else 0)  # prompt rows whose KV stays fixed
        self.context: DenseCachedAttention | None = None
        self.span_tokens: list[int] = []  # tokens run per call (for tests and stats)

    @torch.no_grad()
    def logits(self, gen: Tensor) -> Tensor:
        b, g = gen.shape
        first = 0 if self.context is None else self.kept
        x = torch.cat([self.prompt[:, first:].expand(b, -1), gen], dim=1)
        live = self.prompt.shape[1] - first  # prompt tokens in this call's span
        pos = torch.arange(first, first + x.shape[1], device=x.device).expand(b, -1)
        logits_from = live - 1 if self.shift else live
        if self.context is None:
            out = self.model(x, position_ids=pos, return_kv=True, logits_from=logits_from)
            kv = [(k[:, :, : self.kept], v[:, :, : self.kept]) for k, v in out.kv]
            self.context = DenseCachedAttention(kv)
        else:
            if self.context.kv[0][0].shape[0] != b:
                kv = [(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)) for k, v in self.context.kv]
                self.context = DenseCachedAttention(kv)
            out = self.model(x, position_ids=pos, context=self.context, logits_from=logits_from)
        self.span_tokens.append(x.shape[1])
        return self.model.token_logits(out.logits, live - logits_from, g)


def joint_prompt(
    spec, instruction_ids: list[int], chunks: list[list[int]], question_ids: list[int], use_bos: bool
) -> list[int]:
    """[BOS] + instruction + ([BOS] + chunk for each selected chunk, document order) + question."""
    bos = [spec.bos_token_id] if spec.bos_token_id is not None else []
    anchor = bos if use_bos else []
    out = bos + list(instruction_ids)
    for c in chunks:
        out += anchor + list(c)
    return out + list(question_ids)


def decode_joint(
    lm,
    question_ids: list[int],
    chunks: list[list[int]],
    cfg: MethodConfig,
    sampler: SamplerConfig,
    instruction_ids: list[int] | None = None,
    seed: int = 0,
    on_step: Callable[[int, Tensor], None] | None = None,
) -> DecodeResult:
    """Denoise the answer with the selected chunks' tokens (document order) re-encoded jointly with the
    instruction and the question."""
    cfg.validate(lm.spec.max_position)
    sampler.validate()
    if not question_ids:
        raise InvalidRequest("question is empty")
    model, spec = lm.model, lm.spec
    prompt = joint_prompt(spec, instruction_ids or [], chunks, question_ids, cfg.use_bos)
    if len(prompt) + sampler.gen_length > spec.max_position:
        raise InvalidRequest(
            f"selected_kv=joint needs {len(prompt) + sampler.gen_length} positions, more than the model's maximum "
            f"length {spec.max_position}: lower top_k or chunk_size"
        )
    denoiser = JointDenoiser(model, torch.tensor([prompt], device=model.device))
    gen = torch.Generator(device=model.device).manual_seed(seed)
    t0 = time.perf_counter()
    result = denoise(denoiser, 1, sampler, spec.mask_token_id, spec.eos_token_ids, model.device, gen, on_step=on_step)
    steps = result.steps
    stats = {
        "selected_chunks": len(chunks),
        "selected_kv": "joint",
        "context_tokens_selected": sum(len(c) for c in chunks),
        "joint_prompt_tokens": len(prompt),
        "kv_tokens_per_step": len(prompt) + sampler.gen_length,
        "steps": steps,
        "first_step_ms": round(1000 * result.step_seconds[0], 3) if steps else 0.0,
        "decode_seconds": round(sum(result.step_seconds), 4),
        "mean_step_ms": round(1000 * sum(result.step_seconds) / max(steps, 1), 3),
        "wall_seconds": round(time.perf_counter() - t0, 4),
    }
    return DecodeResult(tokens=result.tokens[0].tolist(), steps=steps, stats=stats)
