"""LLaDA's masked-diffusion loss: SFT rows mask only the answer span, pre-training rows mask every token.

Per sequence draw t ~ U(eps, 1), mask each eligible token with probability t (at least one), and take cross-entropy
on the masked tokens weighted 1/t, normalized by the number of eligible tokens: an upper bound on their negative
log-likelihood, as in LLaDA. Pre-training rows (whole-sequence masking) teach copying within the context (the
passkey needle states its value twice) and the prose itself; SFT rows teach answering.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from pdllm.models.transformer import DllmModel
from pdllm.training.data import BOS_ID, QUERY_SEGMENT, Batch, attention_mask


class MaskedAttention:
    """An AttentionContext that applies a fixed [B, 1, T, T] boolean mask (chunk structure and padding)."""

    def __init__(self, mask: Tensor) -> None:
        self.mask = mask

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, enable_gqa=k.shape[1] != q.shape[1])


def mask_tokens(batch: Batch, mask_id: int, eps: float, generator: torch.Generator | None = None):
    """Returns (noisy ids, masked bool [B, T], t [B], eligible [B, T]): the answer span of SFT rows, every real
    token but BOS of pre-training rows (`batch.pretrain`), each masked with probability t (at least one per row)."""
    b = batch.ids.shape[0]
    dev = batch.ids.device
    t = eps + (1 - eps) * torch.rand(b, device=dev, generator=generator)
    every = (batch.seg >= QUERY_SEGMENT) & (batch.ids != BOS_ID)
    eligible = torch.where(batch.pretrain[:, None], every, batch.answer)
    masked = (torch.rand(batch.ids.shape, device=dev, generator=generator) < t[:, None]) & eligible
    none = ~masked.any(-1)
    if none.any():
        last = eligible.shape[1] - 1 - eligible.flip(-1).float().argmax(-1)
        masked[none, last[none]] = True
    noisy = torch.where(masked, torch.full_like(batch.ids, mask_id), batch.ids)
    return noisy, masked, t, eligible


def diffusion_loss(model: DllmModel, batch: Batch, eps: float = 1e-3, generator: torch.Generator | None = None):
    """(loss, accuracy on masked answer tokens) for one batch."""
    noisy, masked, t, eligible = mask_tokens(batch, model.spec.mask_token_id, eps, generator)
    first = 0 if bool(batch.pretrain.any()) else int(batch.answer.float().argmax(-1).min())
    out = model(noisy, batch.pos, MaskedAttention(attention_mask(batch.seg, batch.full)), logits_from=first)
    logits = out.logits
    target = batch.ids[:, first:]
    m = masked[:, first:]
    ce = F.cross_entropy(logits[m], target[m], reduction="none")
    weight = (1.0 / t)[:, None].expand_as(m)[m]
    lengths = eligible.sum(-1).clamp_min(1)[:, None].expand_as(m)[m]
    loss = (ce * weight / lengths).sum() / batch.ids.shape[0]
    ans = (m & batch.answer[:, first:])[m]
    acc = (logits[m].argmax(-1) == target[m])[ans].float().mean()
    return loss, acc
