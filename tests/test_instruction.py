"""The instruction part of a prompt: separate from the context everywhere, never chunked, never dropped by
selection (whatever top-K, keep ratio or scoring), at positions 0..P-1 after BOS, and the vanilla prompt unchanged."""

from __future__ import annotations

import pytest
import torch

from pdllm.engine import generate
from pdllm.errors import InvalidRequest
from pdllm.method import ChunkCache, MethodConfig, encode_chunks
from pdllm.method.instruction import encode_instruction
from pdllm.method.selection import keep_count, select_tokens
from pdllm.prompt import encode_request, split_template
from pdllm.sampler import SamplerConfig
from pdllm.tasks import make_sample
from pdllm.tasks.infinitebench import RETRIEVE_PREFIX

SAMPLER = SamplerConfig(gen_length=8, block_length=8, steps=8)
DOC = " ".join(f"Record {i}: the code of box {i} is {1000 + 37 * i}." for i in range(8))
INSTRUCTION = "Read the records and answer with the code only.\n"


def test_split_template_at_the_context_slot():
    t = split_template("Read this story.\n\n{context}\n\nQuestion: {question}\nAnswer:")
    assert t.instruction == "Read this story.\n\n" and t.question == "\n\nQuestion: {question}\nAnswer:"
    with pytest.raises(InvalidRequest, match="exactly once"):
        split_template("no slot")


def test_request_keeps_instruction_apart_from_the_context(lm):
    req = encode_request(lm.tokenizer, DOC, "q?", instruction=INSTRUCTION)
    assert req.instruction_ids == list(INSTRUCTION.encode()) and req.context_ids == list(DOC.encode())
    with pytest.raises(InvalidRequest, match="instruction"):
        encode_request(lm.tokenizer, DOC, "q?", instruction="x" * 5000)


def test_task_samples_carry_their_instruction_separately():
    s = make_sample("passkey", 2000, seed=1)
    assert s.instruction == RETRIEVE_PREFIX + "\n\n" and RETRIEVE_PREFIX not in s.context
    assert s.prompt_text.startswith(RETRIEVE_PREFIX)  # what the model reads in front of the haystack is unchanged
    for task in ("kv_retrieval", "niah_single"):
        assert make_sample(task, 2000, seed=1).instruction


@pytest.mark.parametrize("mode", ["vanilla", "prefix"])
def test_dense_prompt_is_instruction_then_context(lm, mode):
    a = generate(lm, DOC, "What is the code of box 3?", SAMPLER, mode, instruction=INSTRUCTION)
    b = generate(lm, INSTRUCTION + DOC, "What is the code of box 3?", SAMPLER, mode)
    assert a.tokens == b.tokens and a.stats["instruction_tokens"] == len(INSTRUCTION)


def test_token_selection_keeps_every_instruction_row(lm):
    spec = lm.spec
    cfg = MethodConfig(chunk_size=32)
    instr = encode_instruction(lm, list(INSTRUCTION.encode()), lm.model_id)
    chunks = [instr] + encode_chunks(lm, [list(DOC.encode())[:32], list(DOC.encode())[32:64]], cfg, lm.model_id)
    s = max(c.length for c in chunks)
    keys = torch.zeros(spec.num_layers, len(chunks), spec.num_kv_heads, s, spec.head_dim)  # slot i = chunk i
    for i, c in enumerate(chunks):
        keys[:, i, :, : c.length] = c.k
    q = [torch.randn(spec.num_heads, 5, spec.head_dim) for _ in range(spec.num_layers)]
    lengths = [c.length for c in chunks]
    sel = select_tokens(q, list(keys), lengths, [True] * 3, 0.25, [True, False, False])
    want = set(range(instr.length))
    for layer in sel:
        for head in layer:
            assert want <= set(head.tolist())  # the whole instruction, in every layer and KV head
        assert layer.shape[1] == instr.length + 2 * (1 + keep_count(32, 0.25))


@pytest.mark.parametrize("scoring", ["summary", "draft"])
def test_sparse_keeps_the_instruction_whatever_is_selected(lm, scoring):
    method = MethodConfig(chunk_size=32, top_k=1, keep_ratio=0.5, scoring=scoring)
    out = generate(lm, DOC, "What is the code of box 3?", SAMPLER, "sparse", method=method, cache=ChunkCache(),
                   instruction=INSTRUCTION)  # fmt: skip
    stats = out.stats
    p = len(INSTRUCTION) + 1  # BOS + instruction
    assert stats["instruction_tokens"] == len(INSTRUCTION) and stats["selected_chunks"] == 1
    kept = 1 + keep_count(stats["context_tokens_selected"], 0.5)  # the chunk's BOS and half its tokens
    assert stats["selected_tokens"] == p + kept  # the instruction whole
    assert stats["scoring"] == scoring
    without = generate(lm, DOC, "What is the code of box 3?", SAMPLER, "sparse", method=method, cache=ChunkCache())
    assert without.stats["selected_tokens"] == 1 + keep_count(without.stats["context_tokens_selected"], 0.5)
