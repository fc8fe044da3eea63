"""The prefix-cache baseline (Fast-dLLM style): [BOS] + context encoded once as one span, attended densely at every
step while question + block are recomputed. Sparse mode over one whole chunk lays out exactly the same."""

from __future__ import annotations

import torch
from torch import Tensor

from pdllm.models.attention import DenseCachedAttention
from pdllm.models.transformer import DllmModel


@torch.no_grad()
def encode_prefix(model: DllmModel, prefix_ids: list[int]) -> list[tuple[Tensor, Tensor]]:
    """Per layer (k, v) [1, Hkv, P, D] of the prefix alone at positions 0..P-1."""
    if not prefix_ids:
        empty = torch.zeros(1, model.spec.num_kv_heads, 0, model.spec.head_dim, device=model.device, dtype=model.dtype)
        return [(empty, empty)] * model.spec.num_layers
    ids = torch.tensor([prefix_ids], device=model.device)
    return model(ids, return_kv=True, logits_from=None).kv


class PrefixDenoiser:
    """Question + block at positions P.. attend to the cached prefix KV and to themselves."""

    def __init__(self, model: DllmModel, prefix_kv: list[tuple[Tensor, Tensor]], question: Tensor) -> None:
        self.model, self.question = model, question
        self.context = DenseCachedAttention(prefix_kv)
        self.start = prefix_kv[0][0].shape[2]

    @torch.no_grad()
    def logits(self, gen: Tensor) -> Tensor:
        b = gen.shape[0]
        if self.context.kv[0][0].shape[0] != b:
            self.context = DenseCachedAttention(
                [(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)) for k, v in self.context.kv]
            )
        x = torch.cat([self.question.expand(b, -1), gen], dim=1)
        p = self.question.shape[1]
        pos = torch.arange(self.start, self.start + x.shape[1], device=x.device).expand(b, -1)
        start = p - 1 if self.model.spec.shift_logits else p
        out = self.model(x, position_ids=pos, context=self.context, logits_from=start)
        return self.model.token_logits(out.logits, p - start, gen.shape[1])
