"""Building blocks shared by every dLLM family: RMSNorm, rotary embeddings, SwiGLU MLP."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """Hugging Face order: normalize in fp32, cast back, then scale (another order changes fp16 denoising)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class Rotary(nn.Module):
    """Llama-style (rotate-half) rotary embedding for arbitrary position ids."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def cos_sin(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos/sin of shape [B, 1, T, D] for position ids [B, T]."""
        freqs = position_ids.float()[..., None] * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def fuse_linears(linears: list[nn.Linear]) -> tuple[Tensor, Tensor | None]:
    """Concatenate the weights (and biases) of Linear layers that read the same input, and make each layer's
    parameters views into the result: one GEMM then replaces several, with no second copy of the weights."""
    weight = torch.cat([m.weight.detach() for m in linears])
    bias = torch.cat([m.bias.detach() for m in linears]) if linears[0].bias is not None else None
    row = 0
    for m in linears:
        m.weight.data = weight[row : row + m.out_features]
        if bias is not None:
            m.bias.data = bias[row : row + m.out_features]
        row += m.out_features
    return weight, bias


def unfuse_linears(linears: list[nn.Linear]) -> None:
    """Give each layer its own storage again (the fused tensors can then be dropped)."""
    for m in linears:
        m.weight.data = m.weight.data.clone()
        if m.bias is not None:
            m.bias.data = m.bias.data.clone()


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); LLaDA calls these ff_proj / up_proj / ff_out."""

    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.gate = nn.Linear(hidden, inner, bias=False)
        self.up = nn.Linear(hidden, inner, bias=False)
        self.down = nn.Linear(inner, hidden, bias=False)
        self.gate_up: Tensor | None = None  # [2 * inner, hidden] once fused

    def fuse(self, on: bool = True) -> None:
        """gate and up as one GEMM (Block.fuse_projections says when that pays)."""
        if on and self.gate_up is None:
            self.gate_up, _ = fuse_linears([self.gate, self.up])
        elif not on and self.gate_up is not None:
            unfuse_linears([self.gate, self.up])
            self.gate_up = None

    def forward(self, x: Tensor) -> Tensor:
        if self.gate_up is not None:
            gate, up = nn.functional.linear(x, self.gate_up).chunk(2, dim=-1)
            return self.down(nn.functional.silu(gate) * up)
        return self.down(nn.functional.silu(self.gate(x)) * self.up(x))
