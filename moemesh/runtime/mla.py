"""DeepSeek V2/V3 multi-head latent attention (MLA) over a ragged step, with SDPA.

The KV cache holds the COMPRESSED latent, as transformers does: per token and layer the normalised kv latent
[kv_lora_rank] and the rotated shared rope key [qk_rope_head_dim]. Each step expands the gathered context through
kv_b_proj into per-head keys [Hq, qk_nope + qk_rope] and values [Hq, v_head_dim]. That costs a matmul over the
whole context per step but keeps the cache (kv_lora_rank + qk_rope_head_dim) wide instead of
Hq * (qk_nope + qk_rope + v_head_dim): 576 vs 40960 values per token and layer for DeepSeek-V3.

Decode steps through the paged runner (ctx.paged_decode, gpu/decode_graphs.py) skip the expansion: the absorbed
path of mla_absorbed.py attends over the latent itself. Prefill and the CPU keep the expanded path here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moemesh.runtime.attention import causal_mask
from moemesh.runtime.layers import Linear, Loader, RMSNorm
from moemesh.runtime.mla_absorbed import absorbed_decode
from moemesh.runtime.rope import Rotary
from moemesh.runtime.spec import AttentionSpec
from moemesh.runtime.step_context import StepContext


class LatentAttention(nn.Module):
    def __init__(self, spec: AttentionSpec, layers: dict[str, nn.Module]) -> None:
        super().__init__()
        self.spec = spec
        self.proj = nn.ModuleDict(layers)  # q_proj | (q_a_proj, q_a_layernorm, q_b_proj), kv_a_*, kv_b_proj, o_proj

    @classmethod
    def load(cls, ld: Loader, prefix: str, spec: AttentionSpec, eps: float) -> LatentAttention:
        names = ["kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
        names += ["q_proj"] if spec.q_lora_rank is None else ["q_a_proj", "q_b_proj"]
        layers: dict[str, nn.Module] = {n: Linear.load(ld, f"{prefix}.{n}") for n in names}
        layers["kv_a_layernorm"] = RMSNorm.load(ld, f"{prefix}.kv_a_layernorm", 1e-6)
        if spec.q_lora_rank is not None:
            layers["q_a_layernorm"] = RMSNorm.load(ld, f"{prefix}.q_a_layernorm", 1e-6)
        return cls(spec, layers)

    @staticmethod
    def cache_shapes(spec: AttentionSpec) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Per-token cache entry of one layer: latent [kv_lora_rank] and rope key [qk_rope_head_dim]."""
        return (spec.kv_lora_rank,), (spec.qk_rope_head_dim,)

    def _queries(self, x: torch.Tensor) -> torch.Tensor:
        p = self.proj
        if self.spec.q_lora_rank is None:
            q = p["q_proj"](x)
        else:
            q = p["q_b_proj"](p["q_a_layernorm"](p["q_a_proj"](x)))
        return q.view(x.shape[0], self.spec.num_heads, self.spec.head_dim)  # [T, Hq, nope + rope]

    def forward(
        self,
        x: torch.Tensor,  # [T, H]
        rope: tuple[torch.Tensor, torch.Tensor],  # cos, sin [T, 1, rope]
        rotary: Rotary,
        ctx: StepContext,
        pools: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        s, p = self.spec, self.proj
        nope, rdim, vdim, heads = s.qk_nope_head_dim, s.qk_rope_head_dim, s.v_head_dim, s.num_heads
        q_nope, q_rot = self._queries(x).split([nope, rdim], dim=-1)
        latent, k_rot = p["kv_a_proj_with_mqa"](x).split([s.kv_lora_rank, rdim], dim=-1)  # [T, R], [T, r]
        latent = p["kv_a_layernorm"](latent)
        cos, sin = rope
        q_rot = rotary.apply(q_rot, cos, sin)  # [T, Hq, r]
        k_rot = rotary.apply(k_rot[:, None, :], cos, sin)[:, 0]  # [T, r], one key shared by all heads
        if getattr(ctx, "paged_decode", False):  # one token per sequence: attend over the latent (absorbed)
            out = absorbed_decode(q_nope, q_rot, latent, k_rot, p["kv_b_proj"].weight, vdim, ctx, pools, s.scale)
            return p["o_proj"](out)  # [T, H]
        lat_ctx, rot_ctx = ctx.context(pools, latent, k_rot)  # [B, Tk, R], [B, Tk, r]
        b, tk = lat_ctx.shape[:2]
        kv = p["kv_b_proj"](lat_ctx.to(x.dtype)).view(b, tk, heads, nope + vdim)
        k_nope, v = kv.split([nope, vdim], dim=-1)  # [B, Tk, Hq, nope], [B, Tk, Hq, v]
        k = torch.cat((k_nope, rot_ctx.to(x.dtype)[:, :, None, :].expand(b, tk, heads, rdim)), dim=-1)
        q = ctx.pad_queries(torch.cat((q_nope, q_rot), dim=-1))  # [B, Tq, Hq, nope + rope]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=causal_mask(ctx, q), scale=s.scale
        )  # [B, Hq, Tq, v]
        out = ctx.unpad(out.transpose(1, 2))  # [T, Hq, v]
        return p["o_proj"](out.reshape(x.shape[0], heads * vdim))
