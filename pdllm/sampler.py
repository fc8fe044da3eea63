"""The denoising loop of masked-diffusion LMs, independent of how a step's logits are computed.

`denoise` owns the generated tokens; a `Denoiser` turns them into logits. Vanilla (full recompute), prefix-cache and
sparse modes are three Denoisers behind the same loop, so they make the same decisions given the same logits.

Two unmasking rules: LLaDA's (a fixed number of tokens per step, chosen by low-confidence remasking or at random)
and Fast-dLLM's parallel decoding (every masked token whose confidence passes a threshold, at least one per step).
Generation proceeds block by block (semi-autoregressive) and stops after a block that produced an end token.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from pdllm.errors import InvalidRequest


class Denoiser(Protocol):
    def logits(self, gen: Tensor) -> Tensor:
        """gen: [B, G] current generated tokens (mask ids where still masked). Returns [B, G, V] float logits."""
        ...


@dataclass(frozen=True)
class SamplerConfig:
    gen_length: int = 64
    block_length: int = 32
    steps: int = 64  # LLaDA rule: total steps over all blocks; parallel rule: an upper bound
    temperature: float = 0.0
    remasking: str = "low_confidence"  # or "random"
    threshold: float | None = None  # set: Fast-dLLM parallel decoding
    stop_at_eos: bool = True

    def validate(self) -> None:
        if self.gen_length < 1 or self.block_length < 1:
            raise InvalidRequest("gen_length and block_length must be >= 1")
        if self.gen_length % self.block_length:
            raise InvalidRequest(f"gen_length {self.gen_length} is not a multiple of block_length {self.block_length}")
        blocks = self.gen_length // self.block_length
        if self.steps < blocks or self.steps % blocks:
            raise InvalidRequest(f"steps {self.steps} must be a positive multiple of the block count {blocks}")
        if self.temperature < 0:
            raise InvalidRequest(f"temperature must be >= 0, got {self.temperature}")
        if self.remasking not in ("low_confidence", "random"):
            raise InvalidRequest(f"remasking must be low_confidence or random, got {self.remasking!r}")
        if self.threshold is not None and not 0.0 < self.threshold <= 1.0:
            raise InvalidRequest(f"threshold must be in (0, 1], got {self.threshold}")


@dataclass
class DenoiseResult:
    tokens: Tensor  # [B, G'] generated tokens, truncated after the last completed block
    steps: int
    step_seconds: list[float] = field(default_factory=list)


def tokens_per_step(masked: int, steps: int) -> list[int]:
    """Spread `masked` unmaskings over `steps` steps as evenly as LLaDA does (earlier steps take the remainder)."""
    base, rem = divmod(masked, steps)
    return [base + (1 if i < rem else 0) for i in range(steps)]


def add_gumbel_noise(logits: Tensor, temperature: float, generator: torch.Generator | None) -> Tensor:
    """LLaDA's sampling: argmax of logits perturbed by Gumbel noise (in float64, as low precision hurts it)."""
    if temperature == 0:
        return logits
    logits = logits.double()
    noise = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float64)
    gumbel = (-torch.log(noise.clamp_min(1e-20))) ** temperature
    return logits.exp() / gumbel


def denoise(
    denoiser: Denoiser,
    batch: int,
    cfg: SamplerConfig,
    mask_id: int,
    eos_ids: tuple[int, ...] = (),
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
    on_step: Callable[[int, Tensor], None] | None = None,
) -> DenoiseResult:
    cfg.validate()
    gen = torch.full((batch, cfg.gen_length), mask_id, dtype=torch.long, device=device)
    blocks = cfg.gen_length // cfg.block_length
    steps_per_block = cfg.steps // blocks
    eos = torch.tensor(eos_ids or (-1,), device=device)
    step = 0
    step_seconds: list[float] = []
    end = cfg.gen_length
    for blk in range(blocks):
        lo, hi = blk * cfg.block_length, (blk + 1) * cfg.block_length
        schedule = tokens_per_step(cfg.block_length, steps_per_block)
        for i in range(steps_per_block if cfg.threshold is None else cfg.block_length):
            masked = gen[:, lo:hi] == mask_id
            if not masked.any():
                break
            t0 = time.perf_counter()
            logits = denoiser.logits(gen)[:, lo:hi]
            chosen = add_gumbel_noise(logits, cfg.temperature, generator).argmax(-1)
            if cfg.remasking == "low_confidence":
                conf = torch.softmax(logits.float(), dim=-1).gather(-1, chosen[..., None]).squeeze(-1)
            else:
                conf = torch.rand(chosen.shape, generator=generator, device=gen.device)
            conf = torch.where(masked, conf, torch.full_like(conf, -1.0))
            if cfg.threshold is None:
                k = schedule[min(i, len(schedule) - 1)]
                take = topk_mask(conf, torch.full((batch,), k, device=gen.device).minimum(masked.sum(-1)))
            else:
                take = (conf >= cfg.threshold) & masked
                take |= topk_mask(conf, masked.any(-1).long())  # at least one per step
            block = gen[:, lo:hi]
            gen[:, lo:hi] = torch.where(take, chosen, block)
            step += 1
            step_seconds.append(time.perf_counter() - t0)
            if on_step is not None:
                on_step(step, gen)
        if cfg.stop_at_eos and eos_ids and bool(torch.isin(gen[:, lo:hi], eos).any(-1).all()):
            end = hi
            break
    return DenoiseResult(tokens=gen[:, :end], steps=step, step_seconds=step_seconds)


def topk_mask(scores: Tensor, k: Tensor) -> Tensor:
    """Boolean mask of each row's k[b] highest scores (ties go to the earlier position, whatever follows it)."""
    order = scores.argsort(dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order))
    return ranks < k[:, None]


def strip_after_eos(tokens: list[int], eos_ids: tuple[int, ...], mask_id: int) -> list[int]:
    """The answer: tokens before the first end token, without leftover masks."""
    out = []
    for t in tokens:
        if t in eos_ids:
            break
        if t != mask_id:
            out.append(t)
    return out
