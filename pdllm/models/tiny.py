"""Tiny random dLLM checkpoints (either family) for tests and for a first run before a trained model exists."""

from __future__ import annotations

from pathlib import Path

import torch

from pdllm.models import dream, llada
from pdllm.models.checkpoint import save_checkpoint
from pdllm.models.spec import ModelSpec
from pdllm.models.tokenizer import BOS, BYTE_VOCAB, EOS, MASK, PAD, save_byte_tokenizer, special_ids
from pdllm.models.transformer import DllmModel


def tiny_spec(
    family: str = "llada",
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int | None = None,
    inner: int = 128,
    max_position: int = 8192,
) -> ModelSpec:
    ids = special_ids()
    return ModelSpec(
        family=family,
        vocab_size=BYTE_VOCAB + len(ids),
        hidden_size=hidden,
        intermediate_size=inner,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads or heads,
        rope_theta=10000.0,
        rms_norm_eps=1e-5 if family == "llada" else 1e-6,
        max_position=max_position,
        mask_token_id=ids[MASK],
        bos_token_id=ids[BOS],
        eos_token_ids=(ids[EOS],),
        pad_token_id=ids[PAD],
        qkv_bias=family == "dream",
        tie_word_embeddings=False,
        shift_logits=family == "dream",
    )


def random_model(spec: ModelSpec, seed: int = 0) -> DllmModel:
    torch.manual_seed(seed)
    model = DllmModel(spec)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.8, 1.2)
            else:
                p.normal_(0.0, 0.08 if "bias" not in name else 0.02)
    return model.eval()


def make_tiny_checkpoint(out_dir: str | Path, family: str = "llada", seed: int = 0, shards: int = 1, **shape) -> Path:
    """Write a random checkpoint of `family` (real tensor names and config fields) plus the byte tokenizer."""
    if family not in (llada.MODEL_TYPE, dream.MODEL_TYPE.lower()):
        raise ValueError(f"unknown family {family!r}")
    model = random_model(tiny_spec(family, **shape), seed)
    save_checkpoint(model, out_dir, shards=shards)
    save_byte_tokenizer(out_dir)
    return Path(out_dir)
