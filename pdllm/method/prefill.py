"""Chunked prefill: each chunk is encoded on its own as [BOS] + chunk at chunk-local positions, in padded batches.

A chunk's KV then depends on nothing but its tokens, so one encoding serves every request that contains it. Batches
are filled in order of chunk length, so chunks of a text cut (which end at borders, 50-100% of the chunk size) are
padded to a neighbour of about their own length rather than to the longest of eight in document order.
"""

from __future__ import annotations

import torch

from pdllm.method.chunk_kv import ChunkKV
from pdllm.method.chunks import chunk_id
from pdllm.method.config import MethodConfig
from pdllm.method.selection import summarize_keys, summary_layers
from pdllm.models.attention import SelfAttention


def prefill_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices of the chunks each prefill batch encodes: by length, shortest first (stable, so equal lengths keep
    document order), `batch_size` at a time."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    step = max(1, batch_size)
    return [order[lo : lo + step] for lo in range(0, len(order), step)]


@torch.no_grad()
def encode_chunks(
    lm,
    chunks: list[list[int]],
    cfg: MethodConfig,
    model_id: str,
    batch_size: int = 8,
    chunk_ids: list[str] | None = None,
) -> list[ChunkKV]:
    """Encode `chunks` (token lists without BOS) once each; returns one ChunkKV per chunk, in the order given.
    `chunk_ids`: their chunk ids when the caller has them already (each chunk is hashed once per request)."""
    cfg.validate(lm.spec.max_position)
    model, spec = lm.model, lm.spec
    bos = [spec.bos_token_id] if cfg.use_bos and spec.bos_token_id is not None else []
    pad = spec.pad_token_id if spec.pad_token_id is not None else 0
    layers = summary_layers(spec.num_layers)
    out: list[ChunkKV | None] = [None] * len(chunks)
    for members in prefill_batches([len(c) for c in chunks], batch_size):
        batch = [bos + list(chunks[i]) for i in members]
        longest = max(len(r) for r in batch)
        ids = torch.tensor([r + [pad] * (longest - len(r)) for r in batch], device=model.device)
        lengths = torch.tensor([len(r) for r in batch], device=model.device)
        valid = torch.arange(longest, device=model.device)[None, :] < lengths[:, None]
        kv = model(
            ids, context=SelfAttention(valid if not bool(valid.all()) else None), return_kv=True, logits_from=None
        ).kv
        k_all = torch.stack([k for k, _ in kv], dim=1)  # [B, L, Hkv, T, D]
        v_all = torch.stack([v for _, v in kv], dim=1)
        for b, (at, row) in enumerate(zip(members, batch, strict=True)):
            s, tokens = len(row), list(chunks[at])
            k, v = k_all[b, :, :, :s].contiguous(), v_all[b, :, :, :s].contiguous()
            summary = summarize_keys([k[layer] for layer in layers], s, bool(bos), model.rotary)
            cid = chunk_ids[at] if chunk_ids is not None else chunk_id(model_id, tokens, cfg.chunk_size, cfg.use_bos)
            out[at] = ChunkKV(chunk_id=cid, tokens=tokens, k=k, v=v, summary=summary, has_bos=bool(bos))
    return out  # type: ignore[return-value]  # prefill_batches covers every index once
