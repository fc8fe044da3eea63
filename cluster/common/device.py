"""Which device an actor runs on, the same rule for prefill and decode actors."""

from __future__ import annotations

import torch


def pick_device(gpus: float) -> str:
    """ "cuda" when Ray gave the actor a GPU share and CUDA is there, else "cpu"."""
    return "cuda" if gpus > 0 and torch.cuda.is_available() else "cpu"
