"""The instruction part of a prompt: [BOS] + instruction tokens encoded once at positions 0..P-1, cached by content
like a chunk, and kept whole in every mode (never ranked, never evicted)."""

from __future__ import annotations

import hashlib
import struct

import torch

from pdllm.method.chunk_cache import ChunkCache
from pdllm.method.chunk_kv import ChunkKV
from pdllm.method.selection import summarize_keys, summary_layers

INSTRUCTION_ID_VERSION = 1


def instruction_id(model_id: str, tokens: list[int]) -> str:
    """sha256 hex of (model, instruction tokens); a namespace of its own so it never equals a chunk id."""
    h = hashlib.sha256()
    h.update(f"pdllm-instruction/v{INSTRUCTION_ID_VERSION}\0{model_id}\0".encode())
    h.update(struct.pack(f"<{len(tokens)}q", *tokens))
    return h.hexdigest()


@torch.no_grad()
def encode_instruction(lm, tokens: list[int], model_id: str) -> ChunkKV:
    """[BOS] + tokens through the model alone at positions 0..P-1 (BOS only if the model has one)."""
    model, spec = lm.model, lm.spec
    bos = [spec.bos_token_id] if spec.bos_token_id is not None else []
    ids = torch.tensor([bos + list(tokens)], device=model.device)
    kv = model(ids, return_kv=True, logits_from=None).kv
    k = torch.stack([k[0] for k, _ in kv])  # [L, Hkv, P, D]
    v = torch.stack([v[0] for _, v in kv])
    summary = summarize_keys([k[i] for i in summary_layers(spec.num_layers)], k.shape[2], bool(bos), model.rotary)
    return ChunkKV(instruction_id(model_id, tokens), list(tokens), k, v, summary, has_bos=bool(bos))


def instruction_kv(lm, tokens: list[int], cache: ChunkCache | None, model_id: str) -> ChunkKV | None:
    """The instruction's KV (None for an empty instruction), from `cache` when it holds it."""
    if not tokens:
        return None
    iid = instruction_id(model_id, tokens)
    found = cache.get(iid) if cache is not None else None
    if found is not None:
        return found
    entry = encode_instruction(lm, tokens, model_id)
    if cache is not None:
        cache.put(entry)
    return entry
