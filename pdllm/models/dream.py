"""Dream family (Dream-v0-Base/Instruct-7B): Qwen2 names with q/k/v bias, GQA, shifted logits, model_type "Dream"."""

from __future__ import annotations

from pdllm.models.llada import _ids
from pdllm.models.naming import NameMap
from pdllm.models.spec import ModelSpec

MODEL_TYPE = "Dream"
DEFAULT_MASK_TOKEN_ID = 151666

NAMES = NameMap(
    [
        ("model.embed_tokens.weight", "embed.weight"),
        ("model.layers.{i}.input_layernorm.weight", "layers.{i}.attn_norm.weight"),
        ("model.layers.{i}.self_attn.q_proj.weight", "layers.{i}.q_proj.weight"),
        ("model.layers.{i}.self_attn.k_proj.weight", "layers.{i}.k_proj.weight"),
        ("model.layers.{i}.self_attn.v_proj.weight", "layers.{i}.v_proj.weight"),
        ("model.layers.{i}.self_attn.q_proj.bias", "layers.{i}.q_proj.bias"),
        ("model.layers.{i}.self_attn.k_proj.bias", "layers.{i}.k_proj.bias"),
        ("model.layers.{i}.self_attn.v_proj.bias", "layers.{i}.v_proj.bias"),
        ("model.layers.{i}.self_attn.o_proj.weight", "layers.{i}.o_proj.weight"),
        ("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.mlp_norm.weight"),
        ("model.layers.{i}.mlp.gate_proj.weight", "layers.{i}.mlp.gate.weight"),
        ("model.layers.{i}.mlp.up_proj.weight", "layers.{i}.mlp.up.weight"),
        ("model.layers.{i}.mlp.down_proj.weight", "layers.{i}.mlp.down.weight"),
        ("model.norm.weight", "norm.weight"),
        ("lm_head.weight", "lm_head.weight"),
    ]
)


def spec_from_config(cfg: dict) -> ModelSpec:
    """Dream's config is Qwen2's: hidden_size, num_attention_heads, num_key_value_heads, intermediate_size..."""
    heads = int(cfg["num_attention_heads"])
    return ModelSpec(
        family="dream",
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        rope_theta=float(cfg.get("rope_theta", 10000.0)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_position=int(cfg.get("max_position_embeddings", 32768)),
        mask_token_id=int(cfg.get("mask_token_id", DEFAULT_MASK_TOKEN_ID)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_ids(cfg.get("eos_token_id")),
        pad_token_id=cfg.get("pad_token_id"),
        qkv_bias=True,  # Qwen2 attention always carries q/k/v biases
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        shift_logits=True,
    )


def config_from_spec(spec: ModelSpec) -> dict:
    return {
        "model_type": MODEL_TYPE,
        "architectures": ["DreamModel"],
        "hidden_act": "silu",
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "vocab_size": spec.vocab_size,
        "rope_theta": spec.rope_theta,
        "rms_norm_eps": spec.rms_norm_eps,
        "max_position_embeddings": spec.max_position,
        "mask_token_id": spec.mask_token_id,
        "bos_token_id": spec.bos_token_id,
        "eos_token_id": spec.eos_token_ids[0] if spec.eos_token_ids else None,
        "pad_token_id": spec.pad_token_id,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "attention_bias": True,
    }
