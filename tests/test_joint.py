"""selected_kv=joint: one bidirectional forward over the whole prompt and the masked block, then only the generated
tokens recomputed against the fixed prompt KV.

* Its first step is the vanilla step exactly when the prompt is the same tokens (no per-chunk BOS, no instruction).
* Later steps attend to the prompt KV of that first forward (checked against a hand-built reference).
* With every chunk selected, the bundled model answers as the prefix cache does.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pdllm.engine import VanillaDenoiser, generate
from pdllm.errors import InvalidRequest
from pdllm.method import ChunkCache, MethodConfig
from pdllm.method.joint import JointDenoiser, decode_joint, joint_prompt
from pdllm.models.attention import DenseCachedAttention
from pdllm.models.loader import LoadedModel
from pdllm.models.tiny import random_model, tiny_spec
from pdllm.sampler import SamplerConfig
from pdllm.tasks import make_sample, score, tokenizer_counter


def tiny_lm(family: str, kv_heads: int | None = None) -> LoadedModel:
    spec = tiny_spec(family, layers=2, kv_heads=kv_heads)
    return LoadedModel(random_model(spec, 3), None, spec, Path("."), f"tiny-{family}")


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 250, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def gen_with_one_token(lm, g: int = 8) -> torch.Tensor:
    gen = torch.full((1, g), lm.spec.mask_token_id)
    gen[0, 3] = 66
    return gen


@pytest.mark.parametrize("family,kv_heads", [("llada", None), ("dream", 2)])
def test_first_step_is_the_vanilla_step_and_later_steps_read_the_fixed_prompt_kv(family, kv_heads):
    lm = tiny_lm(family, kv_heads)
    chunks, question = [ids(16, 1), ids(16, 2)], ids(6, 3)
    prompt = joint_prompt(lm.spec, [], chunks, question, use_bos=False)
    assert prompt == [lm.spec.bos_token_id] + chunks[0] + chunks[1] + question
    x = torch.tensor([prompt])
    joint, vanilla = JointDenoiser(lm.model, x), VanillaDenoiser(lm.model, x)
    gen = gen_with_one_token(lm)
    torch.testing.assert_close(joint.logits(gen), vanilla.logits(gen), rtol=1e-5, atol=1e-5)
    # a later step: the prompt KV from the first forward (which saw the masked block) is reused, not recomputed
    first = lm.model(torch.cat([x, gen], dim=1), return_kv=True, logits_from=None).kv
    kept = len(prompt) - (1 if lm.spec.shift_logits else 0)
    gen2 = gen.clone()
    gen2[0, 5] = 67
    live = torch.cat([x[:, kept:], gen2], dim=1)
    pos = torch.arange(kept, kept + live.shape[1])[None]
    ctx = DenseCachedAttention([(k[:, :, :kept], v[:, :, :kept]) for k, v in first])
    start = live.shape[1] - gen2.shape[1]
    logits_from = start - 1 if lm.spec.shift_logits else start
    ref = lm.model(live, position_ids=pos, context=ctx, logits_from=logits_from).logits
    want = lm.model.token_logits(ref, start - logits_from, gen2.shape[1])
    torch.testing.assert_close(joint.logits(gen2), want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(joint.logits(gen2), vanilla.logits(gen2), atol=1e-4)  # it is not a re-encode
    assert joint.span_tokens == [len(prompt) + 8, len(prompt) - kept + 8, len(prompt) - kept + 8]


def test_joint_prompt_keeps_instruction_and_anchors_chunks():
    lm = tiny_lm("llada")
    bos = lm.spec.bos_token_id
    assert joint_prompt(lm.spec, [5, 6], [[1, 2], [3]], [9], use_bos=True) == [bos, 5, 6, bos, 1, 2, bos, 3, 9]


def test_joint_beyond_the_model_length_is_a_clear_error():
    lm = tiny_lm("llada")
    sampler = SamplerConfig(gen_length=8, block_length=8, steps=8)
    too_long = [ids(64, i) for i in range(200)]  # 12.8K tokens > 8192
    with pytest.raises(InvalidRequest, match="selected_kv=joint needs"):
        decode_joint(lm, ids(4, 1), too_long, MethodConfig(chunk_size=64), sampler)


@pytest.mark.parametrize("seed", [0, 1])
def test_joint_with_every_chunk_selected_answers_as_the_prefix_cache(bundled_lm, seed):
    lm = bundled_lm
    s = make_sample("passkey", 1500, seed, tokenizer_counter(lm.tokenizer))
    sampler = SamplerConfig(gen_length=16, block_length=16, steps=16, threshold=0.9)
    method = MethodConfig(chunk_size=512, top_k=8, selected_kv="joint")
    joint = generate(
        lm, s.context, s.question, sampler, "sparse", method=method, cache=ChunkCache(), instruction=s.instruction
    )
    prefix = generate(lm, s.context, s.question, sampler, "prefix", method=method, instruction=s.instruction)
    assert joint.stats["selected_chunks"] == joint.stats["chunks"] == 3  # every chunk
    assert joint.stats["selected_kv"] == "joint"
    assert joint.answer == prefix.answer and score("passkey", joint.answer, s.answers) == 1.0
