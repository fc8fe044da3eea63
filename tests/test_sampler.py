"""The denoising loop: LLaDA's schedule, Fast-dLLM's threshold rule, EOS stopping, and generate's JSON output."""

from __future__ import annotations

import json

import pytest
import torch

from pdllm.cli import main
from pdllm.errors import InvalidRequest
from pdllm.sampler import SamplerConfig, denoise, tokens_per_step

MASK, EOS, V = 9, 8, 10


class ScriptedDenoiser:
    """Logits that make token `target[j]` certain with confidence rising along the sequence."""

    def __init__(self, target: list[int], sharp: float = 1.0) -> None:
        self.target, self.sharp, self.calls, self.seen = target, sharp, 0, []

    def logits(self, gen):
        self.calls += 1
        self.seen.append(gen.clone())
        g = gen.shape[1]
        out = torch.zeros(gen.shape[0], g, V)
        for j in range(g):
            out[:, j, self.target[j]] = self.sharp * (1 + j / g)
        return out


def test_tokens_per_step_matches_llada_schedule():
    assert tokens_per_step(32, 5) == [7, 7, 6, 6, 6]
    assert sum(tokens_per_step(17, 4)) == 17


def test_llada_rule_unmasks_fixed_count_most_confident_first():
    target = list(range(8))
    d = ScriptedDenoiser(target)
    res = denoise(d, 1, SamplerConfig(gen_length=8, block_length=8, steps=4), MASK, ())
    assert res.tokens[0].tolist() == target and res.steps == 4
    # step 1 unmasks the 2 most confident (last) positions
    assert (d.seen[1][0] != MASK).nonzero().flatten().tolist() == [6, 7]


def test_semi_autoregressive_blocks_fill_in_order():
    d = ScriptedDenoiser(list(range(8)))
    denoise(d, 1, SamplerConfig(gen_length=8, block_length=4, steps=4), MASK, ())
    assert (d.seen[2][0, 4:] == MASK).all() and (d.seen[2][0, :4] != MASK).all()


def test_threshold_rule_unmasks_all_confident_tokens_at_once():
    d = ScriptedDenoiser(list(range(8)), sharp=50.0)
    res = denoise(d, 1, SamplerConfig(gen_length=8, block_length=8, steps=8, threshold=0.9), MASK, ())
    assert res.steps == 1 and res.tokens[0].tolist() == list(range(8))


def test_threshold_rule_takes_at_least_one_token_per_step():
    d = ScriptedDenoiser(list(range(8)), sharp=0.01)
    res = denoise(d, 1, SamplerConfig(gen_length=8, block_length=8, steps=8, threshold=0.99), MASK, ())
    assert res.steps == 8 and res.tokens[0].tolist() == list(range(8))


def test_stops_after_block_with_eos():
    target = [1, 2, EOS, 3, 4, 5, 6, 7]
    d = ScriptedDenoiser(target)
    res = denoise(d, 1, SamplerConfig(gen_length=8, block_length=4, steps=8), MASK, (EOS,))
    assert res.tokens[0].tolist() == [1, 2, EOS, 3] and d.calls == 4


@pytest.mark.parametrize(
    "cfg",
    [
        SamplerConfig(gen_length=10, block_length=4),
        SamplerConfig(gen_length=8, block_length=4, steps=3),
        SamplerConfig(temperature=-1),
        SamplerConfig(threshold=1.5),
        SamplerConfig(remasking="bogus"),
    ],
)
def test_bad_sampler_config(cfg):
    with pytest.raises(InvalidRequest):
        cfg.validate()


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_generate_cli_json(family, tiny_llada, tiny_dream, tmp_path, capsys):
    ctx = tmp_path / "ctx.txt"
    ctx.write_text("The pass key is 4711. " * 20)
    model = tiny_llada if family == "llada" else tiny_dream
    rc = main(
        [
            "generate",
            "--in-process",
            "--model",
            str(model),
            "--context-file",
            str(ctx),
            "--question",
            "What is the pass key?",
            "--gen-length",
            "16",
            "--block-length",
            "8",
            "--steps",
            "8",
            "--json",
        ]
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert isinstance(out["answer"], str)
    assert out["stats"]["steps"] <= 8 and out["stats"]["context_tokens"] == len("The pass key is 4711. " * 20)
