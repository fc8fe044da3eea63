"""Training with compiled layers (train.py --compile): the same loss and gradients as the eager step, over batches
of new shapes and layouts, with every auxiliary loss. The CPU runs dynamo's tracing and autograd (aot_eager backend:
no code generation, so the suite stays fast); the GPU's generated kernels are checked and timed by
benchmarks/bench_training_step.py --variants."""

from __future__ import annotations

import random

import torch

from pdllm.models.tiny import random_model, tiny_spec
from pdllm.training.data import curriculum, make_batch
from pdllm.training.objective import batch_layout, diffusion_loss
from pdllm.training.train import compile_blocks

LOSSES = {"rank_weight": 0.2, "pointer_weight": 0.5, "key_weight": 0.5, "match_weight": 0.5}


def _steps(model, batches):
    out = []
    for batch in batches:
        model.zero_grad(set_to_none=True)
        loss, metrics = diffusion_loss(model, batch, 0.1, torch.Generator().manual_seed(0), layout=batch_layout(batch),
                                       rank_across_rows=True, **LOSSES)  # fmt: skip
        loss.backward()
        out.append((loss.detach(), metrics, {n: p.grad.clone() for n, p in model.named_parameters()}))
    return out


def test_compiled_blocks_train_as_the_eager_model_does():
    stages = curriculum("recall_wordings")
    rng = random.Random(3)
    # chunked recall rows of several shapes (one of a single row), then dense rows of the long stage
    batches = [make_batch(rng, stages[1], 2048, tokens, (1.0, 0.0)) for tokens in (3000, 2500, 900)]
    batches += [make_batch(rng, stages[-1], 2048, 3000, (0.0, 0.0)) for _ in range(2)]
    assert len({b.ids.shape for b in batches}) == len(batches) and min(b.ids.shape[0] for b in batches) == 1
    model = random_model(tiny_spec("llada", hidden=32, layers=4, heads=2, inner=64), seed=1)
    eager = _steps(model, batches)
    keys = list(model.state_dict())
    torch._dynamo.reset()
    compile_blocks(model, backend="aot_eager")
    compiled = _steps(model, batches)
    assert list(model.state_dict()) == keys  # checkpoints and exports are unchanged
    assert {"point", "key", "match", "rank"} <= set(eager[0][1])  # every auxiliary loss ran
    for (loss, metrics, grads), (c_loss, c_metrics, c_grads) in zip(eager, compiled, strict=True):
        assert set(c_metrics) == set(metrics)
        torch.testing.assert_close(c_loss, loss, rtol=1e-5, atol=1e-6)
        for name, grad in grads.items():
            torch.testing.assert_close(c_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
