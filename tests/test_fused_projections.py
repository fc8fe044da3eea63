"""Fused q/k/v and gate/up projections: the same forward (logits and K/V) as the separate ones, in both families,
with no second copy of the weights, and undone exactly."""

from __future__ import annotations

import pytest
import torch

from pdllm.models.loader import load_model
from pdllm.models.tiny import make_tiny_checkpoint


@pytest.mark.parametrize("family", ["llada", "dream"])  # dream: q/k/v biases and GQA
def test_fused_forward_equals_the_separate_projections(tmp_path, family):
    lm = load_model(make_tiny_checkpoint(tmp_path / family, family, seed=3), device="cpu")
    model = lm.model
    ids = torch.randint(0, lm.spec.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids, return_kv=True)
        weights, keys = sum(p.numel() for p in model.parameters()), set(model.state_dict())
        model.fuse_projections()
        assert set(model.state_dict()) == keys  # nothing registered: checkpoints save and load as before
        layer = model.layers[0]
        assert layer.qkv is not None and layer.mlp.gate_up is not None
        assert layer.k_proj.weight.data_ptr() == layer.qkv[0].data_ptr() + layer.q_proj.weight.numel() * 4
        assert sum(p.numel() for p in model.parameters()) == weights
        fused = model(ids, return_kv=True)
        model.fuse_projections(False)
        after = model(ids, return_kv=True)
    assert layer.qkv is None and layer.mlp.gate_up is None
    torch.testing.assert_close(fused.logits, before.logits, rtol=1e-5, atol=1e-5)
    for (k0, v0), (k1, v1) in zip(before.kv, fused.kv, strict=True):
        torch.testing.assert_close(k1, k0, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v1, v0, rtol=1e-5, atol=1e-5)
        assert v1.untyped_storage().nbytes() == v1.numel() * v1.element_size()  # not a view of the q/k/v output
    assert torch.equal(after.logits, before.logits)
