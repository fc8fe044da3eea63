"""Our lean models equal the `transformers` Llama (LLaDA) and Qwen2 (Dream) classes run bidirectionally.

The reference model is built first with random weights; its tensors are then written under the real LLaDA / Dream
checkpoint names (spelled out here independently of our name tables), loaded with our loader, and compared.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from pdllm.models.loader import load_model
from pdllm.models.tokenizer import save_byte_tokenizer

VOCAB = 260

LLADA_NAMES = {  # transformers Llama name -> LLaDA (OLMo-style) checkpoint name
    "model.embed_tokens.weight": "model.transformer.wte.weight",
    "model.norm.weight": "model.transformer.ln_f.weight",
    "lm_head.weight": "model.transformer.ff_out.weight",
}
LLADA_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "q_proj.weight",
    "self_attn.k_proj.weight": "k_proj.weight",
    "self_attn.v_proj.weight": "v_proj.weight",
    "self_attn.o_proj.weight": "attn_out.weight",
    "post_attention_layernorm.weight": "ff_norm.weight",
    "mlp.gate_proj.weight": "ff_proj.weight",
    "mlp.up_proj.weight": "up_proj.weight",
    "mlp.down_proj.weight": "ff_out.weight",
}


def llada_name(hf_name: str) -> str:
    if hf_name in LLADA_NAMES:
        return LLADA_NAMES[hf_name]
    _, _, idx, rest = hf_name.split(".", 3)
    return f"model.transformer.blocks.{idx}.{LLADA_LAYER[rest]}"


def randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.02 if name.endswith("bias") else 0.1
            p.copy_(
                1.0 + 0.1 * torch.randn(p.shape, generator=g)
                if "norm" in name
                else scale * torch.randn(p.shape, generator=g)
            )


def write_shards(state: dict[str, torch.Tensor], out, shards: int) -> None:
    names = sorted(state)
    if shards == 1:
        save_file({n: state[n].contiguous() for n in names}, str(out / "model.safetensors"))
        return
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = names[s::shards]
        save_file({n: state[n].contiguous() for n in part}, str(out / fname))
        weight_map.update(dict.fromkeys(part, fname))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def bidirectional_logits(hf_model, ids: torch.Tensor) -> torch.Tensor:
    mask = torch.ones(ids.shape[0], 1, ids.shape[1], ids.shape[1], dtype=torch.bool)
    return hf_model(ids, attention_mask=mask).logits.float()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("heads,kv_heads,shards", [(4, 4, 1), (8, 2, 3), (6, 3, 2)])
def test_llada_matches_transformers_llama(tmp_path, heads, kv_heads, shards):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, theta = 16 * heads, 2, 500000.0
    hf = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=hidden,
            intermediate_size=96,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            rope_theta=theta,
            rms_norm_eps=1e-5,
            attention_bias=False,
            tie_word_embeddings=False,
            attn_implementation="eager",
        )
    ).eval()
    randomize(hf, seed=heads)
    write_shards({llada_name(n): t for n, t in hf.state_dict().items()}, tmp_path, shards)
    config = {
        "model_type": "llada",
        "architectures": ["LLaDAModelLM"],
        "block_type": "llama",
        "layer_norm_type": "rms",
        "activation_type": "silu",
        "rope": True,
        "d_model": hidden,
        "n_heads": heads,
        "n_kv_heads": kv_heads,
        "n_layers": layers,
        "mlp_hidden_size": 96,
        "vocab_size": VOCAB,
        "embedding_size": VOCAB,
        "rope_theta": theta,
        "rms_norm_eps": 1e-5,
        "max_sequence_length": 4096,
        "mask_token_id": 258,
        "eos_token_id": 256,
        "pad_token_id": 259,
        "include_bias": False,
        "include_qkv_bias": False,
        "weight_tying": False,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_byte_tokenizer(tmp_path)

    ours = load_model(tmp_path)
    ids = torch.randint(0, 256, (2, 37))
    with torch.no_grad():
        assert rel_err(ours.model(ids).logits, bidirectional_logits(hf, ids)) < 1e-4


@pytest.mark.parametrize("heads,kv_heads,shards", [(4, 4, 1), (8, 2, 2), (7, 1, 1)])
def test_dream_matches_transformers_qwen2(tmp_path, heads, kv_heads, shards):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    hidden, layers, theta = 16 * heads, 2, 1e6
    hf = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=VOCAB,
            hidden_size=hidden,
            intermediate_size=80,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            rope_theta=theta,
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
            attn_implementation="eager",
        )
    ).eval()
    randomize(hf, seed=heads + 100)
    assert any(n.endswith("q_proj.bias") for n in hf.state_dict())  # Qwen2 names, with q/k/v bias
    write_shards(dict(hf.state_dict()), tmp_path, shards)
    config = {
        "model_type": "Dream",
        "architectures": ["DreamModel"],
        "hidden_size": hidden,
        "intermediate_size": 80,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": VOCAB,
        "rope_theta": theta,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 32768,
        "mask_token_id": 258,
        "bos_token_id": 257,
        "eos_token_id": 256,
        "pad_token_id": 259,
        "tie_word_embeddings": False,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_byte_tokenizer(tmp_path)

    ours = load_model(tmp_path)
    assert ours.spec.shift_logits and ours.spec.num_kv_heads == kv_heads
    ids = torch.randint(0, 256, (2, 41))
    with torch.no_grad():
        assert rel_err(ours.model(ids).logits, bidirectional_logits(hf, ids)) < 1e-4


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_span_attending_to_cached_prefix_equals_full_forward(family):
    """With one layer, a prefix's K/V does not depend on later tokens, so a tail run at shifted positions that
    attends to the returned prefix K/V must reproduce the full forward's tail exactly (one code path)."""
    from pdllm.models.attention import DenseCachedAttention
    from pdllm.models.tiny import random_model, tiny_spec

    model = random_model(tiny_spec(family, layers=1, kv_heads=2), seed=5)
    ids = torch.randint(0, 256, (2, 30))
    with torch.no_grad():
        full = model(ids).logits
        prefix = model(ids[:, :18], return_kv=True, logits_from=None)
        pos = torch.arange(18, 30).expand(2, 12)
        tail = model(ids[:, 18:], position_ids=pos, context=DenseCachedAttention(prefix.kv)).logits
    assert rel_err(tail, full[:, 18:]) < 1e-5
