"""q/k RMSNorm per head (Qwen3) + rotate-half RoPE in place on the fused q/k/v rows of a step, and at decode the K/V
pool writes in the same launch (two index_copy launches a layer fewer):

    qkv [T, (Hq + 2 Hkv) D] -> program (t, h) per q or k head: norm (weights) -> rope (cos/sin [T, D]) -> in place
                            -> k programs, with pools: rotated K and V of token t -> slot slots[t]
                               (fp8 pools: saturated e4m3 bytes; the fp8 V pool keeps each block's tokens innermost)

Prefill-sized steps without pool writes go to norm_rope_rows.py (ROWS tokens a program).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moemesh.runtime.gpu import norm_rope_rows, pdl
from moemesh.runtime.gpu.paged_attention import check_pools, kv_bytes, narrow
from moemesh.runtime.gpu.pdl import enter


@triton.jit
def _norm_rope(qkv_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, kp_ptr, vp_ptr, slot_ptr, stride_t, eps,
               Q_HEADS: tl.constexpr, K_HEADS: tl.constexpr, D: tl.constexpr, NORM: tl.constexpr,
               WRITE_KV: tl.constexpr, FP8_KV: tl.constexpr = False, BS: tl.constexpr = 1, PDL: tl.constexpr = False):
    """Program (t, h): head h of token t's row, h < Q_HEADS a q head, else k head h - Q_HEADS (v is not rotated)."""
    enter(PDL)  # PDL: launch the next kernel early, wait for the last (pdl.py)
    t = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    is_k = head >= Q_HEADS
    row = qkv_ptr + t * stride_t + head * D  # head h (q, then k, then v heads) at columns h * D ..
    i = tl.arange(0, D)  # [D]
    partner = (i + D // 2) % D  # rotate-half: out[i] = x[i] cos[i] -/+ x[partner] sin[i]
    x = tl.load(row + i)
    xp = tl.load(row + partner)
    dtype = x.dtype
    x, xp = x.to(tl.float32), xp.to(tl.float32)
    if NORM:  # per-head RMSNorm, rounded to the dtype after the scale and after the weight, as RMSNorm does
        r = tl.rsqrt(tl.sum(x * x, 0) / D + eps)
        w_ptr = tl.where(is_k, kw_ptr, qw_ptr)
        x = ((x * r).to(dtype).to(tl.float32) * tl.load(w_ptr + i).to(tl.float32)).to(dtype).to(tl.float32)
        xp = ((xp * r).to(dtype).to(tl.float32) * tl.load(w_ptr + partner).to(tl.float32)).to(dtype).to(tl.float32)
    cos = tl.load(cos_ptr + t * D + i).to(tl.float32)
    sin = tl.load(sin_ptr + t * D + i).to(tl.float32)
    out = x * cos + tl.where(i < D // 2, -xp, xp) * sin
    tl.store(row + i, out.to(dtype))
    if WRITE_KV:  # decode: a k program also writes its head of this token's K (rotated) and V into the pools
        if is_k:
            kv = tl.load(slot_ptr + t) * (K_HEADS * D) + (head - Q_HEADS) * D + i  # [D] in pools [slots, Hkv, D]
            tl.store(kp_ptr + kv, narrow(out, dtype, FP8_KV))
            v = tl.load(row + K_HEADS * D + i)  # v head h - Q_HEADS sits K_HEADS heads after k head h - Q_HEADS
            if FP8_KV:  # the token-minor V pool [blocks, Hkv, D, BS] (kv_cache.py)
                slot = tl.load(slot_ptr + t)
                kv = (slot // BS * K_HEADS + head - Q_HEADS) * (D * BS) + i * BS + slot % BS
            tl.store(vp_ptr + kv, narrow(v, dtype, FP8_KV))


def norm_rope_(qkv: torch.Tensor, q_heads: int, k_heads: int, head_dim: int, q_weight: torch.Tensor | None,
               k_weight: torch.Tensor | None, eps: float, cos: torch.Tensor, sin: torch.Tensor,
               kv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> None:
    """qkv [T, (Hq + 2 Hkv) * D] (q heads, then k heads, then v): q and k normalised per head (if weights) and
    rotated in place; cos/sin [T, D] contiguous (the rope table, attention factor included). kv = (k_pool, v_pool,
    slots): also write each token's rotated K and its V into pool slot slots[t] (pools [S, Hkv, D] contiguous,
    slots [T] int64), which saves the decode step two index_copy launches per layer."""
    t = qkv.shape[0]
    if not t:
        return
    if kv is None and t >= norm_rope_rows.MIN_TOKENS:  # prefill: ROWS tokens a program
        return norm_rope_rows.norm_rope_rows_(qkv, q_heads, k_heads, head_dim, q_weight, k_weight, eps, cos, sin)
    norm = q_weight is not None
    if kv is not None and not all(p.is_contiguous() for p in kv[:2]):
        raise ValueError("norm_rope_ writes K/V into contiguous pools only")
    k_pool, v_pool, slots = kv if kv is not None else (qkv, qkv, qkv)
    if kv is not None:
        check_pools(k_pool, v_pool)
    (k_pool, fp8), (v_pool, _) = kv_bytes(k_pool), kv_bytes(v_pool)
    # One program per head. H200, Qwen3-30B-A3B decode (benchmarks/h200/small_kernels.py, us per layer): 1.64,
    # against 2.0 / 2.02 with 2 / 4 heads per program and 2.42 with two programs (all q heads, all k heads).
    _norm_rope[(t, q_heads + k_heads)](qkv, q_weight if norm else qkv, k_weight if norm else qkv, cos, sin, k_pool,
                                       v_pool, slots, qkv.stride(0), eps, Q_HEADS=q_heads, K_HEADS=k_heads,
                                       D=head_dim, NORM=norm, WRITE_KV=kv is not None, FP8_KV=fp8,
                                       BS=v_pool.shape[-1] if fp8 else 1,
                                       num_warps=max(1, min(4, head_dim // 128)), **pdl.launch())
