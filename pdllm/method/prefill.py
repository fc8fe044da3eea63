"""Chunked prefill: each chunk is encoded on its own as [BOS] + chunk at chunk-local positions, in padded batches.

A chunk's KV then depends on nothing but its tokens, so one encoding serves every request that contains it.
"""

from __future__ import annotations

import torch

from pdllm.method.chunk_kv import ChunkKV
from pdllm.method.chunks import chunk_id
from pdllm.method.config import MethodConfig
from pdllm.method.selection import summarize_keys, summary_layers
from pdllm.models.attention import SelfAttention


@torch.no_grad()
def encode_chunks(
    lm,
    chunks: list[list[int]],
    cfg: MethodConfig,
    model_id: str,
    batch_size: int = 8,
    chunk_ids: list[str] | None = None,
) -> list[ChunkKV]:
    """Encode `chunks` (token lists without BOS) once each; returns one ChunkKV per chunk, in order. `chunk_ids`: their
    chunk ids when the caller has them already (each chunk is hashed once per request)."""
    cfg.validate(lm.spec.max_position)
    model, spec = lm.model, lm.spec
    bos = [spec.bos_token_id] if cfg.use_bos and spec.bos_token_id is not None else []
    pad = spec.pad_token_id if spec.pad_token_id is not None else 0
    layers = summary_layers(spec.num_layers)
    out: list[ChunkKV] = []
    for lo in range(0, len(chunks), max(1, batch_size)):
        batch = [bos + list(c) for c in chunks[lo : lo + batch_size]]
        longest = max(len(r) for r in batch)
        ids = torch.tensor([r + [pad] * (longest - len(r)) for r in batch], device=model.device)
        lengths = torch.tensor([len(r) for r in batch], device=model.device)
        valid = torch.arange(longest, device=model.device)[None, :] < lengths[:, None]
        kv = model(
            ids, context=SelfAttention(valid if not bool(valid.all()) else None), return_kv=True, logits_from=None
        ).kv
        k_all = torch.stack([k for k, _ in kv], dim=1)  # [B, L, Hkv, T, D]
        v_all = torch.stack([v for _, v in kv], dim=1)
        for b, row in enumerate(batch):
            s, tokens = len(row), list(chunks[lo + b])
            k, v = k_all[b, :, :, :s].contiguous(), v_all[b, :, :, :s].contiguous()
            summary = summarize_keys([k[i] for i in layers], s, bool(bos), model.rotary)
            cid = (
                chunk_ids[lo + b] if chunk_ids is not None else chunk_id(model_id, tokens, cfg.chunk_size, cfg.use_bos)
            )
            out.append(ChunkKV(chunk_id=cid, tokens=tokens, k=k, v=v, summary=summary, has_bos=bool(bos)))
    return out
