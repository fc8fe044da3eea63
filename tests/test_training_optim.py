"""The training step's optimizer: fused AdamW that skips a non-finite update on the device, with no host wait."""

from __future__ import annotations

import torch

from pdllm.training.optim import make_optimizer, step_if_finite


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3))


def _backward(model: torch.nn.Module, poison: bool = False) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    x = torch.linspace(-1, 1, 24).view(4, 6)
    model(x).square().mean().backward()
    if poison:
        next(model.parameters()).grad[0, 0] = float("nan")
    return torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)


def test_a_finite_step_is_the_unfused_adamw_step() -> None:
    fused, plain = _model(), _model()
    opt = make_optimizer(fused, 1e-2)
    groups = [{"params": [p for p in plain.parameters() if p.dim() == 2], "weight_decay": 0.1},
              {"params": [p for p in plain.parameters() if p.dim() < 2], "weight_decay": 0.0}]  # fmt: skip
    ref = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), foreach=False)
    for _ in range(3):
        skipped = step_if_finite(opt, _backward(fused))
        _backward(plain)
        ref.step()
        assert float(skipped) == 0.0
    for a, b in zip(fused.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not hasattr(opt, "found_inf")  # the flag does not leak into the next step


def test_a_non_finite_gradient_leaves_weights_moments_and_step_count_untouched() -> None:
    model = _model()
    opt = make_optimizer(model, 1e-2)
    step_if_finite(opt, _backward(model))
    weights = [p.detach().clone() for p in model.parameters()]
    state = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()}
    norm = _backward(model, poison=True)
    assert not torch.isfinite(norm)
    assert float(step_if_finite(opt, norm)) == 1.0
    for p, w in zip(model.parameters(), weights, strict=True):
        assert torch.equal(p, w)
        for k, v in opt.state[p].items():
            assert torch.equal(v, state[id(p)][k]), k
    step_if_finite(opt, _backward(model))  # the next finite step trains again, as the second step
    assert float(opt.state[next(model.parameters())]["step"]) == 2.0
    assert not all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))
