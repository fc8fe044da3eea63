"""The bundled tiny model: committed in the LLaDA layout, loads offline, and answers by denoising."""

from __future__ import annotations

import os

from pdllm.assets import default_model_dir


def test_files_are_small_enough_to_commit():
    files = list(default_model_dir().iterdir())
    assert {"config.json", "tokenizer.json", "model.safetensors.index.json"} <= {f.name for f in files}
    assert all(f.stat().st_size < 16 * 2**20 for f in files)
    assert sum(f.stat().st_size for f in files) < 30 * 10**6


def test_loads_offline_and_answers_in_the_task_format(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from pdllm.engine import generate
    from pdllm.models.loader import load_model
    from pdllm.sampler import SamplerConfig
    from pdllm.tasks import make_sample

    lm = load_model(default_model_dir())
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert lm.spec.family == "llada" and lm.spec.num_layers == 8 and lm.spec.hidden_size == 256
    assert lm.tokenizer("AZ", add_special_tokens=False).input_ids == [65, 90]
    s = make_sample("passkey", 700, seed=0)
    out = generate(lm, s.context, s.question, SamplerConfig(gen_length=16, block_length=16, steps=16, threshold=0.9))
    assert out.answer.strip() == s.answers[0]  # trained, not random: the document's pass key, then the end token
