"""LLaDA's masked-diffusion loss, restricted to the answer span (SFT style).

Per sequence draw t ~ U(eps, 1), mask each answer token with probability t (at least one), and take cross-entropy on
the masked tokens weighted 1/t, normalized by the answer length: an upper bound on the answer's negative
log-likelihood, as in LLaDA's SFT objective.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from pdllm.models.transformer import DllmModel
from pdllm.training.data import Batch, attention_mask


class MaskedAttention:
    """An AttentionContext that applies a fixed [B, 1, T, T] boolean mask (chunk structure and padding)."""

    def __init__(self, mask: Tensor) -> None:
        self.mask = mask

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, enable_gqa=k.shape[1] != q.shape[1])


def mask_answer(batch: Batch, mask_id: int, eps: float, generator: torch.Generator | None = None):
    """Returns (noisy ids, masked bool [B, T], t [B])."""
    b = batch.ids.shape[0]
    dev = batch.ids.device
    t = eps + (1 - eps) * torch.rand(b, device=dev, generator=generator)
    masked = (torch.rand(batch.ids.shape, device=dev, generator=generator) < t[:, None]) & batch.answer
    none = ~masked.any(-1)
    if none.any():  # guarantee one masked answer token per row
        first = batch.answer.float().argmax(-1)
        masked[none, first[none]] = True
    noisy = torch.where(masked, torch.full_like(batch.ids, mask_id), batch.ids)
    return noisy, masked, t


def diffusion_loss(model: DllmModel, batch: Batch, eps: float = 1e-3, generator: torch.Generator | None = None):
    """(loss, answer-token accuracy on masked positions) for one batch."""
    noisy, masked, t = mask_answer(batch, model.spec.mask_token_id, eps, generator)
    first = int(batch.answer.float().argmax(-1).min())  # logits only from the earliest answer start on
    out = model(noisy, batch.pos, MaskedAttention(attention_mask(batch.seg, batch.full)), logits_from=first)
    logits = out.logits
    target = batch.ids[:, first:]
    m = masked[:, first:]
    ce = F.cross_entropy(logits[m], target[m], reduction="none")
    weight = (1.0 / t)[:, None].expand_as(m)[m]
    lengths = batch.answer.sum(-1).clamp_min(1)[:, None].expand_as(m)[m]
    loss = (ce * weight / lengths).sum() / batch.ids.shape[0]
    acc = (logits[m].argmax(-1) == target[m]).float().mean()
    return loss, acc
