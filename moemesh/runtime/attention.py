"""Grouped-query self-attention over a ragged step (Llama, Mixtral, Qwen2/3-MoE, OLMoE), with SDPA.

Per layer the KV cache holds the rotated keys and the values of every head group: K [slots, Hkv, D], V [slots, Hkv, D].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moemesh.runtime.layers import Linear, Loader, RMSNorm
from moemesh.runtime.rope import Rotary
from moemesh.runtime.spec import AttentionSpec
from moemesh.runtime.step_context import StepContext


class Attention(nn.Module):
    def __init__(self, spec: AttentionSpec, q: Linear, k: Linear, v: Linear, o: Linear,
                 q_norm: RMSNorm | None = None, k_norm: RMSNorm | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = q, k, v, o
        self.q_norm, self.k_norm = q_norm, k_norm

    @classmethod
    def load(cls, ld: Loader, prefix: str, spec: AttentionSpec, eps: float) -> Attention:
        projections = [Linear.load(ld, f"{prefix}.{p}_proj") for p in "qkvo"]
        norms = [RMSNorm.load(ld, f"{prefix}.{n}", eps) for n in ("q_norm", "k_norm")] if spec.qk_norm else [None, None]
        return cls(spec, *projections, *norms)

    @staticmethod
    def cache_shapes(spec: AttentionSpec) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Per-token cache entry of one layer: K [Hkv, D] and V [Hkv, D]."""
        return (spec.num_kv_heads, spec.head_dim), (spec.num_kv_heads, spec.head_dim)

    def forward(
        self,
        x: torch.Tensor,  # [T, H]
        rope: tuple[torch.Tensor, torch.Tensor],  # cos, sin [T, 1, D]
        rotary: Rotary,
        ctx: StepContext,
        pools: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        s = self.spec
        t = x.shape[0]
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # [T, Hq*D], [T, Hkv*D], [T, Hkv*D]
        if s.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if s.clip_qkv is not None:
            q, k, v = (z.clamp(-s.clip_qkv, s.clip_qkv) for z in (q, k, v))
        q = q.view(t, s.num_heads, s.head_dim)
        k = k.view(t, s.num_kv_heads, s.head_dim)
        v = v.view(t, s.num_kv_heads, s.head_dim)
        if s.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope
        q, k = rotary.apply(q, cos, sin), rotary.apply(k, cos, sin)
        k_ctx, v_ctx = ctx.context(pools, k, v)  # [B, Tk, Hkv, D]
        q_pad = ctx.pad_queries(q)  # [B, Tq, Hq, D]
        out = F.scaled_dot_product_attention(
            q_pad.transpose(1, 2),  # [B, Hq, Tq, D]
            k_ctx.transpose(1, 2).to(q.dtype),  # [B, Hkv, Tk, D]
            v_ctx.transpose(1, 2).to(q.dtype),
            attn_mask=ctx.mask,
            scale=s.scale,
            enable_gqa=s.num_heads != s.num_kv_heads,
        )  # [B, Hq, Tq, D]
        out = ctx.unpad(out.transpose(1, 2))  # [T, Hq, D]
        return self.o_proj(out.reshape(t, s.num_heads * s.head_dim))
