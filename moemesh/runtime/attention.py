"""Grouped-query self-attention over a ragged step (Llama, Mixtral, Qwen2/3-MoE, OLMoE), with SDPA.

Per layer the KV cache holds the rotated keys and the values of every head group: K [slots, Hkv, D], V [slots, Hkv, D].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from moemesh.runtime.kv_cache import FP8, store
from moemesh.runtime.layers import Linear, Loader, RMSNorm
from moemesh.runtime.rope import Rotary
from moemesh.runtime.spec import AttentionSpec
from moemesh.runtime.step_context import StepContext


def causal_mask(ctx: StepContext, q: torch.Tensor):
    """SDPA's attn_mask for this step. One sequence on CUDA: query t sees keys 0 .. c + t, which is causal aligned to
    the lower right (no mask tensor: the flash kernel skips the blocks above the diagonal). A 4,096-token prompt of
    the Qwen3-30B-A3B shape on the H200 spent 0.80 ms a layer in cuDNN's SDPA with the explicit [1, 1, Tq, Tk] mask
    (every block computed, 47% of the prefill). Several sequences on CUDA go through paged_prefill; the CPU (its
    numerics pinned by the parity tests) keeps the explicit mask."""
    if ctx.batch == 1 and q.is_cuda:
        return causal_lower_right(ctx.q_len, ctx.kv_len)
    return ctx.mask


def paged_prefill(ctx: StepContext, q: torch.Tensor, pools, spec: AttentionSpec) -> bool:
    """Whether this step attends through gpu/prefill_attention.py: several sequences on CUDA with a paged cache (one
    sequence keeps SDPA's causal kernel, the CPU the padded SDPA path)."""
    if ctx.batch == 1 or not q.is_cuda or pools is None or ctx.table is None:
        return False
    from moemesh.runtime.gpu.prefill_attention import usable

    return all(p.is_contiguous() and p.dtype in (q.dtype, FP8) for p in pools) and usable(
        spec.num_heads, spec.num_kv_heads, spec.head_dim)


class Attention(nn.Module):
    def __init__(self, spec: AttentionSpec, q: Linear, k: Linear, v: Linear, o: Linear,
                 q_norm: RMSNorm | None = None, k_norm: RMSNorm | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = q, k, v, o
        self.q_norm, self.k_norm = q_norm, k_norm
        self.fast = False  # CUDA: one q/k/v GEMM, q/k norm + rope in one Triton kernel (set_fast)
        self.fused_qkv: nn.Module | None = None  # backend packed: x -> [T, (Hq + 2 Hkv) D] in one call

    def set_fast(self, on: bool) -> None:
        """Fuse q/k/v into one weight [(Hq + 2 Hkv) D, H] (the three Linears become views of it, no copy kept)."""
        s, projections = self.spec, (self.q_proj, self.k_proj, self.v_proj)
        biases = [p.bias is not None for p in projections]
        self.fast = on and s.qk_norm in (None, "head") and s.clip_qkv is None and len(set(biases)) == 1
        if not self.fast or hasattr(self, "qkv_weight"):
            return
        self.qkv_weight = torch.cat([p.weight for p in projections])
        self.qkv_bias = torch.cat([p.bias for p in projections]) if biases[0] else None
        for p, part in zip(projections, self.qkv_weight.split([p.weight.shape[0] for p in projections])):
            p.weight = torch.nn.Parameter(part, requires_grad=False)

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
        if self.fast:
            return self._forward_fast(x, rope, ctx, pools)
        if self.fused_qkv is not None and not s.qk_norm and s.clip_qkv is None:  # packed (CPU): rope q, k at once
            qkv = self.fused_qkv(x)  # [T, (Hq + 2 Hkv) D]
            heads = s.num_heads + s.num_kv_heads
            qk = rotary.apply(qkv[:, :heads * s.head_dim].view(t, heads, s.head_dim), *rope)  # [T, Hq + Hkv, D]
            q, k = qk[:, :s.num_heads], qk[:, s.num_heads:]
            return self._sdpa(q, k, qkv[:, heads * s.head_dim:].view(t, s.num_kv_heads, s.head_dim), ctx, pools)
        if self.fused_qkv is not None:
            kv_size = s.num_kv_heads * s.head_dim
            q, k, v = self.fused_qkv(x).split([s.num_heads * s.head_dim, kv_size, kv_size], -1)
        else:
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
        if getattr(ctx, "paged_decode", False):  # CUDA decode step: attend through the block tables (gpu/)
            out = ctx.attend(q, k, v, pools, s.scale)  # [T, Hq, D]
            return self.o_proj(out.reshape(t, s.num_heads * s.head_dim))
        return self._sdpa(q, k, v, ctx, pools)

    def _forward_fast(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], ctx: StepContext,
                      pools: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """CUDA: the same function as forward with 3 launches before attention instead of ~30 (gpu/fused_ops)."""
        from moemesh.runtime.gpu.dense_gemv import linear

        return self._attend_fast(linear(x, self.qkv_weight, self.qkv_bias), rope, ctx, pools)

    def forward_normed(self, x: torch.Tensor, delta: torch.Tensor | None, norm: RMSNorm,
                       rope: tuple[torch.Tensor, torch.Tensor], ctx: StepContext,
                       pools: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The fast path (set_fast) of forward(norm(x + delta)): residual x [T, H] and the last block's output
        delta [T, H] (None: x alone) -> (x + delta [T, H], o_proj output [T, H]). At GEMV sizes the add and the
        norm run in the q/k/v GEMV's prologue (dense_gemv.norm_linear): one launch fewer."""
        from moemesh.runtime.gpu.dense_gemv import norm_linear

        x, qkv = norm_linear(x, delta, norm.weight, norm.eps, self.qkv_weight, self.qkv_bias)
        return x, self._attend_fast(qkv, rope, ctx, pools)

    def _attend_fast(self, qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], ctx: StepContext,
                     pools: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """qkv [T, (Hq + 2 Hkv) D] -> o_proj output [T, H]: q/k norm + rope (+ the K/V pool writes) in one launch."""
        from moemesh.runtime.gpu.dense_gemv import linear
        from moemesh.runtime.gpu.norm_rope import norm_rope_

        s, t = self.spec, qkv.shape[0]
        q_size, kv_size = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        norm = s.qk_norm == "head"
        cos, sin = (r.view(t, s.head_dim) for r in rope)
        decode = getattr(ctx, "paged_decode", False)  # decode: the same kernel writes K/V into the pools
        kv = (pools[0], pools[1], ctx.slots) if decode and all(p.is_contiguous() for p in pools) else None
        norm_rope_(qkv, s.num_heads, s.num_kv_heads, s.head_dim, self.q_norm.weight if norm else None,
                   self.k_norm.weight if norm else None, self.q_norm.eps if norm else 0.0, cos, sin, kv)
        q = qkv[:, :q_size].view(t, s.num_heads, s.head_dim)
        k = qkv[:, q_size:q_size + kv_size].view(t, s.num_kv_heads, s.head_dim)
        v = qkv[:, q_size + kv_size:].view(t, s.num_kv_heads, s.head_dim)
        if decode:
            out = ctx.read(q, pools, s.scale) if kv is not None else ctx.attend(q, k, v, pools, s.scale)
            return linear(out.reshape(t, q_size), self.o_proj.weight, self.o_proj.bias)
        return self._sdpa(q, k, v, ctx, pools)

    def _attend_one(self, q: torch.Tensor, k_ctx: torch.Tensor, v_ctx: torch.Tensor) -> torch.Tensor:
        """One query token over its whole context: q [1, Hq, D], k_ctx / v_ctx [Tk, Hkv, D] -> [1, Hq * D]. Two
        batched matmuls and a softmax (SDPA's CPU kernel and the transposes around it cost ~3x that per layer);
        the query heads of one kv head side by side, as SDPA's enable_gqa groups them."""
        s = self.spec
        qg = q.reshape(s.num_kv_heads, s.num_heads // s.num_kv_heads, s.head_dim)  # [Hkv, G, D]
        scores = torch.bmm(qg, k_ctx.permute(1, 2, 0).to(q.dtype)).mul_(s.scale)  # [Hkv, G, Tk]
        out = torch.bmm(scores.softmax(-1), v_ctx.transpose(0, 1).to(q.dtype))  # [Hkv, G, D]
        return out.reshape(1, s.num_heads * s.head_dim)

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: StepContext,
              pools: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """Gathered context + SDPA (prefill, CPU): q [T, Hq, D], k/v [T, Hkv, D] -> o_proj output [T, H]."""
        s, t = self.spec, q.shape[0]
        if paged_prefill(ctx, q, pools, s):  # several sequences on CUDA: through the block tables, no padding
            from moemesh.runtime.gpu.prefill_attention import prefill_attention

            k_pool, v_pool = pools
            store(k_pool, ctx.slots, k)
            store(v_pool, ctx.slots, v)
            out = prefill_attention(q, k_pool, v_pool, ctx.table, ctx.starts, ctx.new, ctx.cached,
                                    ctx.tiles(s.num_heads // s.num_kv_heads), ctx.block_size, s.scale)
            return self.o_proj(out.reshape(t, s.num_heads * s.head_dim))
        k_ctx, v_ctx = ctx.context(pools, k, v)  # [B, Tk, Hkv, D]
        if ctx.batch == 1 and ctx.q_len == 1 and not q.is_cuda:  # a CPU decode step of one sequence
            return self.o_proj(self._attend_one(q, k_ctx[0], v_ctx[0]))
        q_pad = ctx.pad_queries(q)  # [B, Tq, Hq, D]
        out = F.scaled_dot_product_attention(
            q_pad.transpose(1, 2),  # [B, Hq, Tq, D]
            k_ctx.transpose(1, 2).to(q.dtype),  # [B, Hkv, Tk, D]
            v_ctx.transpose(1, 2).to(q.dtype),
            attn_mask=causal_mask(ctx, q),
            scale=s.scale,
            enable_gqa=s.num_heads != s.num_kv_heads,
        )  # [B, Hq, Tq, D]
        out = ctx.unpad(out.transpose(1, 2))  # [T, Hq, D]
        return self.o_proj(out.reshape(t, s.num_heads * s.head_dim))
