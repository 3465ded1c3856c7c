"""q/k RMSNorm per head + RoPE in place for prefill-sized steps: norm_rope.norm_rope_'s function with ROWS tokens per
program instead of one.

    qkv [T, (Hq + 2 Hkv) D] -> program (block of ROWS tokens, head h < Hq + Hkv): x [ROWS, D] of head h,
      per row: x = rmsnorm(x) * w (if weights), out = x * cos + rotate_half(x) * sin       # v heads untouched

Why: norm_rope_'s one program per (token, head) is right for decode (36 programs of one warp at batch 1), but at a
4,096-token prompt it is 147,456 programs of 128 values each: 90 us a layer on the H200 (7% of the prefill), where its
75 MB need about 18.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ROWS = 16  # tokens per program
MIN_TOKENS = 256  # from here on norm_rope_ hands the step to this kernel (decode keeps one program per head)


@triton.jit
def _norm_rope_rows(qkv_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, t, stride_t, eps, Q_HEADS: tl.constexpr,
                    D: tl.constexpr, NORM: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # [ROWS] tokens
    head = tl.program_id(1)
    ok = (rows < t)[:, None]
    i = tl.arange(0, D)
    partner = (i + D // 2) % D  # rotate-half: out[i] = x[i] cos[i] -/+ x[partner] sin[i]
    base = qkv_ptr + rows.to(tl.int64)[:, None] * stride_t + head * D  # [ROWS, 1]
    x = tl.load(base + i[None, :], mask=ok, other=0.0)  # [ROWS, D]
    xp = tl.load(base + partner[None, :], mask=ok, other=0.0)
    dtype = x.dtype
    x, xp = x.to(tl.float32), xp.to(tl.float32)
    if NORM:  # rounded to the dtype after the scale and after the weight, as RMSNorm (and norm_rope_) do
        r = tl.rsqrt(tl.sum(x * x, 1) / D + eps)[:, None]  # [ROWS, 1]
        w_ptr = tl.where(head < Q_HEADS, qw_ptr, kw_ptr)
        w, wp = tl.load(w_ptr + i).to(tl.float32)[None, :], tl.load(w_ptr + partner).to(tl.float32)[None, :]
        x = ((x * r).to(dtype).to(tl.float32) * w).to(dtype).to(tl.float32)
        xp = ((xp * r).to(dtype).to(tl.float32) * wp).to(dtype).to(tl.float32)
    table = rows.to(tl.int64)[:, None] * D + i[None, :]
    cos = tl.load(cos_ptr + table, mask=ok, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + table, mask=ok, other=0.0).to(tl.float32)
    out = x * cos + tl.where((i < D // 2)[None, :], -xp, xp) * sin
    tl.store(base + i[None, :], out.to(dtype), mask=ok)


def norm_rope_rows_(qkv: torch.Tensor, q_heads: int, k_heads: int, head_dim: int, q_weight: torch.Tensor | None,
                    k_weight: torch.Tensor | None, eps: float, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """norm_rope_'s contract without the K/V pool writes: qkv [T, (Hq + 2 Hkv) * D] (row stride any, columns
    contiguous), cos/sin [T, D] contiguous."""
    t = qkv.shape[0]
    norm = q_weight is not None
    _norm_rope_rows[(triton.cdiv(t, ROWS), q_heads + k_heads)](
        qkv, q_weight if norm else qkv, k_weight if norm else qkv, cos, sin, t, qkv.stride(0), eps, Q_HEADS=q_heads,
        D=head_dim, NORM=norm, ROWS=ROWS, num_warps=4)
