"""Small fused Triton kernels for the per-layer path on CUDA: each replaces 5-20 tiny torch launches (in a CUDA graph
every launch still costs ~2 us, and a layer had ~90 of them).

    add_rms_norm   x' = x + delta (optional); h = weight * rmsnorm(x') (float32 statistics, the RMSNorm order)
    norm_rope_     in place on the fused qkv rows: per-head RMSNorm of q and k (Qwen3) then rotate-half rope
    route_softmax  router logits [T, E] -> softmax -> top-k -> optional renormalisation -> (ids, weights)

Each matches the torch reference up to bf16 rounding (one rounding at the end instead of one per torch op).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm(x_ptr, d_ptr, w_ptr, h_ptr, xo_ptr, n, eps, ADD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n
    x = tl.load(x_ptr + row * n + cols, mask=ok, other=0.0)
    if ADD:
        x = (x.to(tl.float32) + tl.load(d_ptr + row * n + cols, mask=ok, other=0.0).to(tl.float32)).to(x.dtype)
        tl.store(xo_ptr + row * n + cols, x, mask=ok)
    xf = x.to(tl.float32)
    r = tl.rsqrt(tl.sum(xf * xf, 0) / n + eps)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(h_ptr + row * n + cols, ((xf * r).to(x.dtype).to(tl.float32) * w).to(h_ptr.dtype.element_ty), mask=ok)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x, delta [T, H] contiguous -> (x + delta, rmsnorm(x + delta) * weight); without delta (x, rmsnorm(x))."""
    t, n = x.shape
    x = x.contiguous()
    delta = delta.contiguous() if delta is not None else None
    h = torch.empty_like(x)
    out = torch.empty_like(x) if delta is not None else x
    if t:
        _add_rms_norm[(t,)](x, delta if delta is not None else x, weight, h, out, n, eps, ADD=delta is not None,
                            BLOCK=triton.next_power_of_2(n), num_warps=4 if n <= 4096 else 8)
    return out, h


@triton.jit
def _norm_rope(qkv_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, stride_t, k_offset, eps,
               Q_HEADS: tl.constexpr, K_HEADS: tl.constexpr, HP: tl.constexpr, D: tl.constexpr,
               NORM: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    is_k = tl.program_id(1)
    heads = tl.where(is_k == 1, K_HEADS, Q_HEADS)
    base = qkv_ptr + t * stride_t + is_k * k_offset
    hh = tl.arange(0, HP)[:, None]  # [HP, 1]
    i = tl.arange(0, D)[None, :]  # [1, D]
    partner = (i + D // 2) % D  # rotate-half: out[i] = x[i] cos[i] -/+ x[partner] sin[i]
    ok = hh < heads
    x = tl.load(base + hh * D + i, mask=ok, other=0.0)
    xp = tl.load(base + hh * D + partner, mask=ok, other=0.0)
    dtype = x.dtype
    x, xp = x.to(tl.float32), xp.to(tl.float32)
    if NORM:  # per-head RMSNorm, rounded to the dtype after the scale and after the weight, as RMSNorm does
        r = tl.rsqrt(tl.sum(x * x, 1) / D + eps)[:, None]  # [HP, 1]
        w_ptr = tl.where(is_k == 1, kw_ptr, qw_ptr)
        x = ((x * r).to(dtype).to(tl.float32) * tl.load(w_ptr + i).to(tl.float32)).to(dtype).to(tl.float32)
        xp = ((xp * r).to(dtype).to(tl.float32) * tl.load(w_ptr + partner).to(tl.float32)).to(dtype).to(tl.float32)
    cos = tl.load(cos_ptr + t * D + i).to(tl.float32)
    sin = tl.load(sin_ptr + t * D + i).to(tl.float32)
    out = x * cos + tl.where(i < D // 2, -xp, xp) * sin
    tl.store(base + hh * D + i, out.to(dtype), mask=ok)


def norm_rope_(qkv: torch.Tensor, q_heads: int, k_heads: int, head_dim: int, q_weight: torch.Tensor | None,
               k_weight: torch.Tensor | None, eps: float, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """qkv [T, (Hq + 2 Hkv) * D] (q heads, then k heads, then v): q and k normalised per head (if weights) and
    rotated in place; cos/sin [T, D] contiguous (the rope table, attention factor included)."""
    t = qkv.shape[0]
    if not t:
        return
    norm = q_weight is not None
    _norm_rope[(t, 2)](qkv, q_weight if norm else qkv, k_weight if norm else qkv, cos, sin, qkv.stride(0),
                       q_heads * head_dim, eps, Q_HEADS=q_heads, K_HEADS=k_heads,
                       HP=triton.next_power_of_2(max(q_heads, k_heads)), D=head_dim, NORM=norm, num_warps=4)


@triton.jit
def _route_softmax(logits_ptr, ids_ptr, w_ptr, e, scale, K: tl.constexpr, KP: tl.constexpr, EP: tl.constexpr,
                   RENORM: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, EP)
    s = tl.load(logits_ptr + t * e + cols, mask=cols < e, other=float("-inf"))
    p = tl.exp(s - tl.max(s, 0))
    p = p / tl.sum(p, 0)  # [EP] probabilities over all experts
    p = tl.where(cols < e, p, -1.0)
    slots = tl.arange(0, KP)
    ids = tl.zeros((KP,), dtype=tl.int64)
    ws = tl.zeros((KP,), dtype=tl.float32)
    for k in tl.static_range(K):  # top-k by repeated arg-max, most likely first (torch.topk's order)
        best = tl.argmax(p, 0)
        ids = tl.where(slots == k, best, ids)
        ws = tl.where(slots == k, tl.max(p, 0), ws)
        p = tl.where(cols == best, -1.0, p)
    if RENORM:
        ws = ws / tl.sum(ws, 0)
    tl.store(ids_ptr + t * K + slots, ids, mask=slots < K)
    tl.store(w_ptr + t * K + slots, ws * scale, mask=slots < K)


def route_softmax(logits: torch.Tensor, top_k: int, renormalize: bool,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] float32 -> (ids [T, K] int64, weights [T, K] float32) as Router's softmax scoring."""
    t, e = logits.shape
    ids = torch.empty(t, top_k, dtype=torch.int64, device=logits.device)
    weights = torch.empty(t, top_k, dtype=torch.float32, device=logits.device)
    if t:
        _route_softmax[(t,)](logits, ids, weights, e, scale, K=top_k, KP=triton.next_power_of_2(top_k),
                             EP=triton.next_power_of_2(e), RENORM=renormalize, num_warps=4)
    return ids, weights
