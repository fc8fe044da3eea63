"""The one bidirectional transformer both dLLM families share (they differ in names, biases and logit shift).

A forward runs a span of tokens at given position ids, may return every layer's K/V (chunk prefill), and lets an
`AttentionContext` add cached K/V to what the span attends to (prefix and sparse decoding): one code path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pdllm.models.attention import AttentionContext, SelfAttention
from pdllm.models.layers import RMSNorm, Rotary, SwiGLU, apply_rotary, fuse_linears, unfuse_linears
from pdllm.models.spec import ModelSpec


@dataclass
class ForwardOutput:
    logits: Tensor | None  # [B, T', V] for the requested positions, float32
    kv: list[tuple[Tensor, Tensor]] | None  # per layer (k, v), each [B, Hkv, T, D], RoPE applied


class Block(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        h, d = spec.hidden_size, spec.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, d
        self.attn_norm = RMSNorm(h, spec.rms_norm_eps)
        self.q_proj = nn.Linear(h, spec.num_heads * d, bias=spec.qkv_bias)
        self.k_proj = nn.Linear(h, spec.num_kv_heads * d, bias=spec.qkv_bias)
        self.v_proj = nn.Linear(h, spec.num_kv_heads * d, bias=spec.qkv_bias)
        self.o_proj = nn.Linear(spec.num_heads * d, h, bias=False)
        self.mlp_norm = RMSNorm(h, spec.rms_norm_eps)
        self.mlp = SwiGLU(h, spec.intermediate_size)
        self.qkv: tuple[Tensor, Tensor | None] | None = None  # fused q/k/v weight and bias

    def fuse_projections(self, on: bool = True) -> None:
        """q/k/v as one GEMM and gate/up as one: 4 weight reads a layer instead of 7, for decode steps of ~100 rows,
        where each GEMM is bound by reading its weights and by its launch. The separate Linear parameters become
        views into the fused tensors (same memory, same state_dict); fuse after the model is on its device."""
        projections = [self.q_proj, self.k_proj, self.v_proj]
        if on and self.qkv is None:
            self.qkv = fuse_linears(projections)
        elif not on and self.qkv is not None:
            unfuse_linears(projections)
            self.qkv = None
        self.mlp.fuse(on)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, layer: int, context: AttentionContext
    ) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = self.project(x, cos, sin)
        return self.finish(x, context.attend(layer, q, k, v)), k, v

    def project(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The attention's q, k, v [B, H, T, D] of the residual stream x, RoPE applied to q and k. Tensors in,
        tensors out, like `finish`: what training compiles (compile_blocks) while attention stays outside."""
        return self.heads(*self.project_tokens(x), cos, sin)

    def project_tokens(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v of each token of x [..., hidden], heads side by side [..., H * D]: per token, so training can
        run it on a batch's tokens without their padding (training.stack)."""
        h = self.attn_norm(x)
        if self.qkv is not None:
            sizes = (self.q_proj.out_features, self.k_proj.out_features, self.v_proj.out_features)
            q, k, v = nn.functional.linear(h, *self.qkv).split(sizes, dim=-1)
            return q, k, v.clone()  # v is returned (chunk KV): its own storage, not a view pinning q/k/v's output
        return self.q_proj(h), self.k_proj(h), self.v_proj(h)

    def heads(self, q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """project_tokens' q, k, v [B, T, H * D] as [B, H, T, D], RoPE applied to q and k."""
        b, t, _ = q.shape
        q = q.reshape(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.reshape(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.reshape(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def finish(self, x: Tensor, att: Tensor) -> Tensor:
        """The residual stream after the attention output `att` [B, H, T, D] and the MLP."""
        b, _, t, _ = att.shape
        return self.finish_tokens(x, att.transpose(1, 2).reshape(b, t, -1))

    def finish_tokens(self, x: Tensor, att: Tensor) -> Tensor:
        """The residual stream of each token after its attention output `att` [..., H * D] and the MLP."""
        x = x + self.o_proj(att)
        return x + self.mlp(self.mlp_norm(x))


class DllmModel(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.embed = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(Block(spec) for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        if spec.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self.rotary = Rotary(spec.head_dim, spec.rope_theta)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor | None = None,
        context: AttentionContext | None = None,
        return_kv: bool = False,
        logits_from: int | None = 0,
        logits_rows: Tensor | None = None,
    ) -> ForwardOutput:
        """Run a span. `logits_from`: first position whose logits are returned (None: no logits at all);
        `logits_rows` [B, R] instead names the span rows whose logits are returned, per batch row."""
        b, t = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(t, device=input_ids.device).expand(b, t)
        context = context or SelfAttention()
        x = self.embed(input_ids)
        cos, sin = self.rotary.cos_sin(position_ids, x.dtype)
        x, kv = self.run_layers(x, cos, sin, context, return_kv)
        logits = None
        if logits_rows is not None:
            rows = x.gather(1, logits_rows[..., None].expand(-1, -1, x.shape[-1]))
            logits = self.lm_head(self.norm(rows)).float()
        elif logits_from is not None:
            logits = self.lm_head(self.norm(x[:, logits_from:])).float()
        return ForwardOutput(logits=logits, kv=kv)

    def run_layers(
        self, x: Tensor, cos: Tensor, sin: Tensor, context: AttentionContext, return_kv: bool
    ) -> tuple[Tensor, list[tuple[Tensor, Tensor]] | None]:
        """The residual stream after every layer, and each layer's (k, v) if asked. One layer at a time, each
        attending through `context`; training swaps in one compiled graph of all layers (training.stack)."""
        kv: list[tuple[Tensor, Tensor]] | None = [] if return_kv else None
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, cos, sin, i, context)
            if kv is not None:
                kv.append((k, v))
        return x, kv

    def fuse_projections(self, on: bool = True) -> None:
        """Fused q/k/v and gate/up GEMMs in every layer (Block.fuse_projections); `on=False` undoes it."""
        for layer in self.layers:
            layer.fuse_projections(on)

    def token_logits(self, full_logits: Tensor, start: int, length: int) -> Tensor:
        """Logits that predict tokens [start, start+length) of the span whose logits are `full_logits`.

        Dream predicts position i from position i-1 (shifted logits), LLaDA from position i itself.
        """
        if self.spec.shift_logits:
            if start < 1:
                raise ValueError("shifted-logit models need at least one token before the predicted span")
            return full_logits[:, start - 1 : start - 1 + length]
        return full_logits[:, start : start + length]
