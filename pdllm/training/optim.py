"""The optimizer step without a host wait: AdamW whose update is skipped on the device when the gradient is not
finite.

`if torch.isfinite(norm): opt.step()` reads the norm on the host, so the CPU stops until the GPU has finished the
step's backward, and the next step's kernels are launched only then: host and device time add up instead of
overlapping. The fused AdamW kernel instead reads a `found_inf` flag on the device (the hook GradScaler uses) and
leaves weights, moments and step count untouched when it is set.
"""

from __future__ import annotations

import torch
from torch import Tensor


def make_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.AdamW:
    """AdamW (betas 0.9 / 0.95, weight decay 0.1 on matrices only), fused: one kernel for all parameters."""
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
        fused=True,
    )


def step_if_finite(opt: torch.optim.AdamW, norm: Tensor) -> Tensor:
    """Apply the update unless `norm` (the gradient norm clip_grad_norm_ returned) is inf or nan; returns the
    device flag 1.0 for a skipped step. Nothing here waits on the device."""
    skipped = (~torch.isfinite(norm)).float()
    opt.found_inf = skipped
    try:
        opt.step()
    finally:
        del opt.found_inf
    return skipped
