"""Which device an actor runs on, and how much of its GPU memory a cache may take.

Actors that share one GPU (a prefill and a decode actor at 0.5 each, the default one-GPU layout) start at the same
time and each sizes its cache (the chunk store, the decode engine's KV pool) from the memory it sees free: left at
that, each takes most of the card and the later allocation runs out of memory. A fraction below 1 therefore caps an
actor's cache at its share of the whole card, less what the process already holds (its weights).
"""

from __future__ import annotations

import torch

FREE_FRACTION = 0.9  # of the memory left free (after the reserve) that a derived cache may take


def pick_device(gpus: float) -> str:
    """'cuda' when the actor was given (a share of) a GPU and one is visible, else 'cpu'."""
    return "cuda" if gpus > 0 and torch.cuda.is_available() else "cpu"


def share_of_gpu(free: int, total: int, held: int, fraction: float, reserve: int = 0) -> int:
    """Bytes a derived cache may take: FREE_FRACTION of the free memory beyond `reserve`, and, for a fraction of
    the GPU below 1, at most `fraction` of the whole card less the `held` bytes this process already uses and the
    reserve. Pure arithmetic so it can be tested without a GPU."""
    if not 0 < fraction:
        raise ValueError(f"a GPU fraction must be > 0, got {fraction}")
    budget = int(FREE_FRACTION * (free - reserve))
    if fraction < 1:
        budget = min(budget, int(fraction * total) - held - reserve)
    return max(0, budget)


def gpu_cache_bytes(fraction: float = 1.0, reserve: int = 0, device: torch.device | str | None = None) -> int:
    """share_of_gpu for the current CUDA device, from what this process holds now (torch's reserved memory)."""
    free, total = torch.cuda.mem_get_info(device)
    return share_of_gpu(free, total, torch.cuda.memory_reserved(device), fraction, reserve)
