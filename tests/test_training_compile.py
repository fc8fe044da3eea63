"""Training with compiled layers (train.py --compile blocks; --compile stack: all layers as one region; --compile
stack+losses: the loss's tensor-only parts too): the same loss and gradients as the eager step, over batches of new
shapes and layouts, with every auxiliary loss. The CPU runs dynamo's tracing and autograd (aot_eager backend: no code
generation, so the suite stays fast); the GPU's generated kernels are checked and timed by
benchmarks/bench_training_step.py --variants."""

from __future__ import annotations

import random

import pytest
import torch
from torch._dynamo.utils import counters

from pdllm.models.tiny import random_model, tiny_spec
from pdllm.training.data import curriculum, make_batch
from pdllm.training.objective import LossTerms, batch_layout, diffusion_loss
from pdllm.training.train import compile_model

LOSSES = {"rank_weight": 0.2, "pointer_weight": 0.5, "key_weight": 0.5, "match_weight": 0.5}


def _steps(model, batches, terms=LossTerms()):
    out = []
    for batch in batches:
        model.zero_grad(set_to_none=True)
        layout = batch_layout(batch, pack=True)  # the packed positions, which a stack that does not pack ignores
        loss, metrics = diffusion_loss(model, batch, 0.1, torch.Generator().manual_seed(0), layout=layout,
                                       rank_across_rows=True, terms=terms, **LOSSES)  # fmt: skip
        loss.backward()
        out.append((loss.detach(), metrics, {n: p.grad.clone() for n, p in model.named_parameters()}))
    return out


@pytest.mark.parametrize("how", ["blocks", "stack", "stack+losses", "stack+losses packed"])
def test_compiled_layers_train_as_the_eager_model_does(how):
    """`packed`: the stack's per-token parts on the batch's tokens alone (train.py --pack-tokens)."""
    stages = curriculum("recall_wordings")
    rng = random.Random(3)
    # chunked recall rows of several shapes (one of a single row), then dense rows of the long stage
    batches = [make_batch(rng, stages[1], 2048, tokens, (1.0, 0.0)) for tokens in (3000, 2500, 900)]
    batches += [make_batch(rng, stages[-1], 2048, 3000, (0.0, 0.0)) for _ in range(2)]
    assert len({b.ids.shape for b in batches}) == len(batches) and min(b.ids.shape[0] for b in batches) == 1
    # every batch has padding (a row is padded to a multiple of 8): a packed stack runs its per-token parts on the
    # batch's tokens alone (the questions' forward for the ranking loss runs them on every position)
    assert all(batch_layout(b, pack=True).tokens is not None for b in batches)
    assert all(batch_layout(b).tokens is None for b in batches)  # a step that does not pack does not search
    model = random_model(tiny_spec("llada", hidden=32, layers=4, heads=2, inner=64), seed=1)
    eager = _steps(model, batches)
    keys = list(model.state_dict())
    torch._dynamo.reset()
    counters.clear()
    how, _, packed = how.partition(" ")
    terms = compile_model(model, how, backend="aot_eager", pack=bool(packed))  # as train.py --compile HOW does
    if how != "blocks":  # every forward of the loss runs in the compiled region, none in the loop
        model.run_layers.plain = lambda *args: pytest.fail("a training forward ran the plain loop")
    compiled = _steps(model, batches, terms)
    if how == "stack+losses":  # each loss part ran as one graph: none broke into eager pieces
        assert not counters["graph_break"] and counters["frames"]["ok"] >= 6
    assert list(model.state_dict()) == keys  # checkpoints and exports are unchanged
    assert {"point", "key", "match", "rank"} <= set(eager[0][1])  # every auxiliary loss ran
    for (loss, metrics, grads), (c_loss, c_metrics, c_grads) in zip(eager, compiled, strict=True):
        assert set(c_metrics) == set(metrics)
        torch.testing.assert_close(c_loss, loss, rtol=1e-5, atol=1e-6)
        for name, grad in grads.items():
            torch.testing.assert_close(c_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_stack_runs_flex_attention_in_its_region():
    """The stack's FlexAttention path (train.py --attention flex --compile stack) gives the eager loss; forward only:
    PyTorch's FlexAttention has no backward on the CPU (the GPU's is checked by bench_training_step --variants)."""
    from pdllm.training.flex import FlexMaskedAttention, FlexTuning

    stages = curriculum("recall_wordings")
    rng = random.Random(4)
    batches = [make_batch(rng, stages[1], 2048, tokens, (1.0, 0.0)) for tokens in (3000, 2500)]
    model = random_model(tiny_spec("llada", hidden=32, layers=4, heads=2, inner=64), seed=1)

    def losses(attention=FlexMaskedAttention):
        with torch.no_grad():
            return [diffusion_loss(model, b, 0.1, torch.Generator().manual_seed(0), layout=batch_layout(b),
                                   attention_class=attention, rank_across_rows=True, **LOSSES)
                    for b in batches]  # fmt: skip

    eager = losses()
    # train.py --flex-options: the same loss with kernel options, and with the block mask in tiles of 64
    for tuning in (None, FlexTuning(128, {"BLOCK_M": 32, "bwd_BLOCK_M1": 16}), FlexTuning(64, {"BLOCK_M": 64})):
        torch._dynamo.reset()
        compile_model(model, "stack", backend="aot_eager", flex_options=tuning)
        model.run_layers.plain = lambda *args: pytest.fail("a training forward ran the plain loop")
        tiled = FlexMaskedAttention.with_mask_block((tuning or FlexTuning()).mask_block)
        for (loss, metrics), (c_loss, c_metrics) in zip(eager, losses(tiled), strict=True):
            assert {"point", "key", "match", "rank"} <= set(metrics)
            torch.testing.assert_close(c_loss, loss, rtol=1e-5, atol=1e-6)
            for name, value in metrics.items():
                torch.testing.assert_close(c_metrics[name], value, rtol=1e-4, atol=1e-6, msg=name)


def test_pack_tokens_is_a_flag_of_the_compiled_stack(capsys):
    from pdllm.training.train import parse_args

    assert parse_args(["--smoke", "--out", "x", "--compile", "stack+losses", "--pack-tokens"]).pack_tokens
    with pytest.raises(SystemExit) as refused:
        parse_args(["--smoke", "--out", "x", "--compile", "blocks", "--pack-tokens"])
    assert refused.value.code == 2 and "--pack-tokens packs the compiled stack" in capsys.readouterr().err
