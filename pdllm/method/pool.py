"""The decode side's view of the selected chunks: per-layer slot pools in the layout the sparse kernel reads, and
the AttentionContext that attends to selected pool rows through `pdllm.kernels.attention`."""

from __future__ import annotations

import torch
from torch import Tensor

from pdllm.kernels import attention
from pdllm.method.chunk_kv import ChunkKV


class ChunkPool:
    """Per layer k/v pools [slots, Hkv, S, D]: slot i holds chunk i ([BOS]+tokens, zero-padded to S rows), then
    `extra_slots` empty slots (where the question's KV goes when it is kept across steps)."""

    def __init__(
        self,
        chunks: list[ChunkKV],
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        device,
        dtype: torch.dtype,
        extra_rows: int = 0,
        min_rows: int = 16,
    ) -> None:
        self.rows = max([c.length for c in chunks] + [min_rows])
        self.num_chunks = len(chunks)
        self.extra_slots = -(-extra_rows // self.rows)
        slots = max(1, self.num_chunks + self.extra_slots)
        shape = (num_layers, slots, num_kv_heads, self.rows, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        for i, c in enumerate(chunks):
            self.k[:, i, :, : c.length] = c.k.to(device=device, dtype=dtype)
            self.v[:, i, :, : c.length] = c.v.to(device=device, dtype=dtype)

    def layer(self, i: int) -> tuple[Tensor, Tensor]:
        return self.k[i], self.v[i]

    def write_extra(self, kv: list[tuple[Tensor, Tensor]], count: int) -> Tensor:
        """Store the first `count` rows of a span's per-layer K/V ([1, Hkv, T, D]) in the extra slots; returns
        their flat row indices [count] int32."""
        first = self.num_chunks * self.rows
        for layer, (k, v) in enumerate(kv):
            for j in range(self.extra_slots):
                lo, hi = j * self.rows, min(count, (j + 1) * self.rows)
                if lo >= hi:
                    break
                self.k[layer, self.num_chunks + j, :, : hi - lo] = k[0, :, lo:hi]
                self.v[layer, self.num_chunks + j, :, : hi - lo] = v[0, :, lo:hi]
        return torch.arange(first, first + count, device=self.k.device, dtype=torch.int32)  # slots are consecutive


class SparseChunkAttention:
    """The span attends to itself plus, per layer and KV head, the selected pool rows `sel_idx[layer]`
    [Hkv, N] (flat slot*S + row); one request (batch 1) per context."""

    def __init__(self, pool: ChunkPool, sel_idx: list[Tensor]) -> None:
        self.pool = pool
        self.sel_idx = [s[None].contiguous() for s in sel_idx]  # [1, Hkv, N]
        n = self.sel_idx[0].shape[-1] if self.sel_idx else 0
        dev = pool.k.device
        self.sel_len = torch.tensor([n], dtype=torch.int32, device=dev)
        if n == 0:  # the kernel wants at least one (masked) index column
            self.sel_idx = [torch.zeros(1, s.shape[0], 1, dtype=torch.int32, device=dev) for s in sel_idx]

    @property
    def selected_rows(self) -> int:
        return int(self.sel_len[0])

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        self_len = torch.full((q.shape[0],), k.shape[2], dtype=torch.int32, device=q.device)
        k_pool, v_pool = self.pool.layer(layer)
        return attention(q, k, v, self_len, k_pool, v_pool, self.sel_idx[layer], self.sel_len)
