"""LLaDA family (LLaDA-8B-Base/Instruct): OLMo-style config fields and tensor names, model_type "llada"."""

from __future__ import annotations

from pdllm.models.naming import NameMap
from pdllm.models.spec import ModelSpec

MODEL_TYPE = "llada"
DEFAULT_MASK_TOKEN_ID = 126336

NAMES = NameMap(
    [
        ("model.transformer.wte.weight", "embed.weight"),
        ("model.transformer.blocks.{i}.attn_norm.weight", "layers.{i}.attn_norm.weight"),
        ("model.transformer.blocks.{i}.q_proj.weight", "layers.{i}.q_proj.weight"),
        ("model.transformer.blocks.{i}.k_proj.weight", "layers.{i}.k_proj.weight"),
        ("model.transformer.blocks.{i}.v_proj.weight", "layers.{i}.v_proj.weight"),
        ("model.transformer.blocks.{i}.q_proj.bias", "layers.{i}.q_proj.bias"),
        ("model.transformer.blocks.{i}.k_proj.bias", "layers.{i}.k_proj.bias"),
        ("model.transformer.blocks.{i}.v_proj.bias", "layers.{i}.v_proj.bias"),
        ("model.transformer.blocks.{i}.attn_out.weight", "layers.{i}.o_proj.weight"),
        ("model.transformer.blocks.{i}.ff_norm.weight", "layers.{i}.mlp_norm.weight"),
        ("model.transformer.blocks.{i}.ff_proj.weight", "layers.{i}.mlp.gate.weight"),
        ("model.transformer.blocks.{i}.up_proj.weight", "layers.{i}.mlp.up.weight"),
        ("model.transformer.blocks.{i}.ff_out.weight", "layers.{i}.mlp.down.weight"),
        ("model.transformer.ln_f.weight", "norm.weight"),
        ("model.transformer.ff_out.weight", "lm_head.weight"),
    ]
)


def _ids(value: object) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list | tuple) else (int(value),)


def spec_from_config(cfg: dict) -> ModelSpec:
    """LLaDA's config: d_model, n_heads, n_kv_heads, n_layers, mlp_hidden_size (or mlp_ratio), embedding_size..."""
    if cfg.get("block_type", "llama") != "llama" or cfg.get("layer_norm_type", "rms") != "rms":
        raise ValueError(f"only LLaDA's llama/rms blocks are supported, got {cfg.get('block_type')}")
    d_model = int(cfg["d_model"])
    n_heads = int(cfg["n_heads"])
    inner = cfg.get("mlp_hidden_size") or int(cfg.get("mlp_ratio", 4)) * d_model
    return ModelSpec(
        family="llada",
        vocab_size=int(cfg.get("embedding_size") or cfg["vocab_size"]),
        hidden_size=d_model,
        intermediate_size=int(inner),
        num_layers=int(cfg["n_layers"]),
        num_heads=n_heads,
        num_kv_heads=int(cfg.get("n_kv_heads") or n_heads),
        rope_theta=float(cfg.get("rope_theta", 10000.0)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        max_position=int(cfg.get("max_sequence_length", 4096)),
        mask_token_id=int(cfg.get("mask_token_id", DEFAULT_MASK_TOKEN_ID)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_ids(cfg.get("eos_token_id")),
        pad_token_id=cfg.get("pad_token_id"),
        qkv_bias=bool(cfg.get("include_qkv_bias") or cfg.get("include_bias")),
        tie_word_embeddings=bool(cfg.get("weight_tying", False)),
        shift_logits=False,
    )


def config_from_spec(spec: ModelSpec) -> dict:
    """The config.json a LLaDA checkpoint of this shape carries (used to write test and bundled checkpoints)."""
    return {
        "model_type": MODEL_TYPE,
        "architectures": ["LLaDAModelLM"],
        "activation_type": "silu",
        "block_type": "llama",
        "layer_norm_type": "rms",
        "rope": True,
        "d_model": spec.hidden_size,
        "n_heads": spec.num_heads,
        "n_kv_heads": spec.num_kv_heads,
        "n_layers": spec.num_layers,
        "mlp_hidden_size": spec.intermediate_size,
        "vocab_size": spec.vocab_size,
        "embedding_size": spec.vocab_size,
        "rope_theta": spec.rope_theta,
        "rms_norm_eps": spec.rms_norm_eps,
        "max_sequence_length": spec.max_position,
        "mask_token_id": spec.mask_token_id,
        "bos_token_id": spec.bos_token_id,
        "eos_token_id": spec.eos_token_ids[0] if spec.eos_token_ids else None,
        "pad_token_id": spec.pad_token_id,
        "include_bias": False,
        "include_qkv_bias": spec.qkv_bias,
        "weight_tying": spec.tie_word_embeddings,
    }
