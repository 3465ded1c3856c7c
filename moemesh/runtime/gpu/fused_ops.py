"""Small fused Triton kernels for the per-layer path on CUDA: each replaces 5-20 tiny torch launches (in a CUDA graph
every launch still costs ~2 us, and a layer had ~90 of them).

    add_rms_norm   x' = x + delta (optional); h = weight * rmsnorm(x') (float32 statistics, the RMSNorm order)
    (norm_rope_    per-head q/k RMSNorm + rope in place, with the decode K/V pool writes: norm_rope.py)
    route_softmax  router logits [T, E] (or split-K partials, router_gemm.py) -> softmax -> top-k -> renorm
    router_logits  x [T, H] @ W^T in float32, one launch at decode sizes (fusing it with route_softmax through a
                   last-program-does-top-k ticket was measured slower on the H200: 5.9 us against 2.4 + 2.4)
    router_logits_norm  add_rms_norm + router_logits in one launch at decode sizes: each program normalises its row
                   (rms_scale, fold_act; dense_gemv.norm_linear folds the input norm into the q/k/v GEMV the same way)

Each matches the torch reference up to bf16 rounding (one rounding at the end instead of one per torch op).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moemesh.runtime.gpu import pdl
from moemesh.runtime.gpu.pdl import enter


@triton.jit
def _add_rms_norm(x_ptr, d_ptr, w_ptr, h_ptr, xo_ptr, n, eps, ADD: tl.constexpr, BLOCK: tl.constexpr,
                  PDL: tl.constexpr = False):
    enter(PDL)  # PDL: launch the next kernel early, wait for the last (pdl.py)
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
                            BLOCK=triton.next_power_of_2(n), num_warps=4 if n <= 4096 else 8, **pdl.launch())
    return out, h


@triton.jit
def _residual(x_ptr, d_ptr, offs, ok, ADD: tl.constexpr):
    """x (+ d) at offs, the sum in float32 rounded to x's dtype (the residual stream's)."""
    x = tl.load(x_ptr + offs, mask=ok, other=0.0)
    if ADD:
        x = (x.to(tl.float32) + tl.load(d_ptr + offs, mask=ok, other=0.0).to(tl.float32)).to(x.dtype)
    return x


@triton.jit
def rms_scale(x_ptr, d_ptr, n, eps, ADD: tl.constexpr, BLOCK: tl.constexpr):
    """1 / rms of the row x (+ d) [n]: _add_rms_norm's statistic, in its order (BLOCK >= n, one reduction)."""
    cols = tl.arange(0, BLOCK)
    xf = _residual(x_ptr, d_ptr, cols, cols < n, ADD).to(tl.float32)
    return tl.rsqrt(tl.sum(xf * xf, 0) / n + eps)


@triton.jit
def fold_act(x_ptr, d_ptr, nw_ptr, xo_ptr, ho_ptr, offs, ok, r, stored, NORM: tl.constexpr, ADD: tl.constexpr,
             STORE_H: tl.constexpr):
    """A GEMV's float32 input chunk at offs (ok = offs < row length): x itself, or (NORM) h = rmsnorm(x + d) * nw
    with _add_rms_norm's roundings (x + d to x's dtype, times r to it, times nw to it), r = rms_scale of the row.
    Where offs < stored (the row length in one program per row, else 0): x + d is stored to xo (ADD) and h to ho
    (STORE_H), both in x's dtype. (A bool scalar & a block mask breaks Triton 3.9's interpreter, hence the bound.)"""
    if NORM:
        x = _residual(x_ptr, d_ptr, offs, ok, ADD)
        if ADD:
            tl.store(xo_ptr + offs, x, mask=offs < stored)
        nw = tl.load(nw_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        x = ((x.to(tl.float32) * r).to(x.dtype).to(tl.float32) * nw).to(x.dtype)
        if STORE_H:
            tl.store(ho_ptr + offs, x, mask=offs < stored)
    else:
        x = tl.load(x_ptr + offs, mask=ok, other=0.0)
    return x.to(tl.float32)


@triton.jit
def _softmax_topk(s, cols, e, ids_ptr, w_ptr, counts_ptr, t, scale, K: tl.constexpr, KP: tl.constexpr,
                  RENORM: tl.constexpr, COUNT: tl.constexpr):
    """s [EP] logits of row t (-inf beyond e) -> ids/weights row t: softmax, top-k by repeated arg-max, renorm.
    COUNT: also add 1 to counts[id] for each chosen expert (the expert-load counters, expert_load.py)."""
    p = tl.exp(s - tl.max(s, 0))
    p = p / tl.sum(p, 0)  # [EP] probabilities over all experts
    p = tl.where(cols < e, p, -1.0)
    slots = tl.arange(0, KP)
    ids = tl.zeros((KP,), dtype=tl.int64)
    ws = tl.zeros((KP,), dtype=tl.float32)
    for k in tl.static_range(K):  # most likely first (torch.topk's order)
        best = tl.argmax(p, 0)
        ids = tl.where(slots == k, best, ids)
        ws = tl.where(slots == k, tl.max(p, 0), ws)
        p = tl.where(cols == best, -1.0, p)
    if RENORM:
        ws = ws / tl.sum(ws, 0)
    tl.store(ids_ptr + t * K + slots, ids, mask=slots < K)
    tl.store(w_ptr + t * K + slots, ws * scale, mask=slots < K)
    if COUNT:
        tl.atomic_add(counts_ptr + ids, tl.full((KP,), 1, tl.int64), mask=slots < K, sem="relaxed")


@triton.jit
def _route_softmax(logits_ptr, ids_ptr, w_ptr, counts_ptr, e, split_stride, scale, K: tl.constexpr,
                   KP: tl.constexpr, EP: tl.constexpr, RENORM: tl.constexpr, COUNT: tl.constexpr,
                   SPLITS: tl.constexpr = 1, PDL: tl.constexpr = False):
    enter(PDL)  # PDL: launch the next kernel early, wait for the last (pdl.py)
    t = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, EP)
    s = tl.load(logits_ptr + t * e + cols, mask=cols < e, other=float("-inf"))
    for i in tl.static_range(1, SPLITS):  # split-K partial sums (router_gemm.py), added in order
        s += tl.load(logits_ptr + i * split_stride + t * e + cols, mask=cols < e, other=0.0)
    _softmax_topk(s, cols, e, ids_ptr, w_ptr, counts_ptr, t, scale, K, KP, RENORM, COUNT)


# Also removed (2026-11-30): the router GEMV's last program per token routing (an acq_rel ticket per (token, expert)
# program, the last reading the row's logits back with .cg loads): H200 5.53 us per layer against 4.08 for this launch
# plus router_logits_norm (benchmarks/h200/small_kernels.py); each program's barrier + atomic and the one program's
# top-k after them cost more than the launch they save.
# Routing inside the expert GEMV's programs (each computing its slot's expert by ranking the row's probabilities)
# was removed: H200 us per layer, alone 2.46 against this launch's 2.11, GEMV included 29.11 against 24.77.
def route_softmax(logits: torch.Tensor, top_k: int, renormalize: bool, scale: float,
                  counts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] float32, or [S, T, E] partial sums (router_gemm.py; contiguous) -> (ids [T, K] int64, weights
    [T, K] float32) as Router's softmax scoring. counts [E] int64 (contiguous): each chosen expert's count + 1."""
    t, e = logits.shape[-2:]
    splits = logits.shape[0] if logits.dim() == 3 else 1
    ids = torch.empty(t, top_k, dtype=torch.int64, device=logits.device)
    weights = torch.empty(t, top_k, dtype=torch.float32, device=logits.device)
    if t:
        _route_softmax[(t,)](logits, ids, weights, counts if counts is not None else ids, e, t * e, scale, K=top_k,
                             KP=triton.next_power_of_2(top_k), EP=triton.next_power_of_2(e), RENORM=renormalize,
                             COUNT=counts is not None, SPLITS=splits, num_warps=1 if e <= 256 else 4, **pdl.launch())
    return ids, weights  # one warp for <= 256 experts: the top-k reductions stay in warp shuffles


@triton.jit
def _router_body(x_ptr, d_ptr, nw_ptr, xo_ptr, ho_ptr, w_ptr, out_ptr, e, h, eps, NORM: tl.constexpr,
                 ADD: tl.constexpr, NORM_BLOCK: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
                 PDL: tl.constexpr):
    """Logits of row t for BLOCK_E experts; NORM: of rmsnorm(x + d) * nw (see fold_act), program (t, 0) stores
    x + d and the normed row for the experts."""
    t = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)  # [BE] experts of this program
    ks = tl.arange(0, BLOCK_K)
    # First K step's weights before the PDL wait (never written during a step; see dense_gemv._gemv).
    w = tl.load(w_ptr + rows[:, None] * h + ks[None, :], mask=(rows[:, None] < e) & (ks < h)[None, :], other=0.0)
    enter(PDL)  # PDL: launch the next kernel early, wait for the last (pdl.py)
    r = 1.0
    if NORM:
        r = rms_scale(x_ptr + t * h, d_ptr + t * h, h, eps, ADD, NORM_BLOCK)
    stored = tl.where(tl.program_id(1) == 0, h, 0)  # program (t, 0) stores x' and h
    x = fold_act(x_ptr + t * h, d_ptr + t * h, nw_ptr, xo_ptr + t * h, ho_ptr + t * h, ks, ks < h, r, stored,
                 NORM, ADD, True)  # [BK] float32
    acc = tl.sum(w * x[None, :], 1)
    for k0 in range(BLOCK_K, h, BLOCK_K):
        k_ok = k0 + ks < h
        x = fold_act(x_ptr + t * h, d_ptr + t * h, nw_ptr, xo_ptr + t * h, ho_ptr + t * h, k0 + ks, k_ok, r, stored,
                     NORM, ADD, True)  # [BK]
        w = tl.load(w_ptr + rows[:, None] * h + k0 + ks[None, :], mask=(rows[:, None] < e) & k_ok[None, :],
                    other=0.0)  # [BE, BK] float32
        acc += tl.sum(w * x[None, :], 1)
    tl.store(out_ptr + t * e + rows, acc, mask=rows < e)


@triton.jit
def _router_logits(x_ptr, w_ptr, out_ptr, e, h, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
                   PDL: tl.constexpr = False):
    _router_body(x_ptr, x_ptr, x_ptr, x_ptr, x_ptr, w_ptr, out_ptr, e, h, 0.0, False, False, 1, BLOCK_E, BLOCK_K,
                 PDL)


@triton.jit
def _router_logits_norm(x_ptr, d_ptr, nw_ptr, xo_ptr, ho_ptr, w_ptr, out_ptr, e, h, eps, ADD: tl.constexpr,
                        NORM_BLOCK: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
                        PDL: tl.constexpr = False):
    _router_body(x_ptr, d_ptr, nw_ptr, xo_ptr, ho_ptr, w_ptr, out_ptr, e, h, eps, True, ADD, NORM_BLOCK, BLOCK_E,
                 BLOCK_K, PDL)


# Rows up to which the one-launch GEMV wins: it re-reads W (float32, 1 MB at 128 experts x 2048) per row from L2.
# Past it, Gate's fast path takes router_gemm.py's split-K partials (9-512 rows; 4.4 us at 64 rows on the H200, one
# program per K block) and the rest cuBLAS. (Measured 2026-11-30, 64 rows, ncu: cuBLAS's SIMT SGEMM + split-K
# reduction 7.3 + 4.6 us; whole-K Triton [16 x 16] tiles, 32 programs, latency-bound: 16.5-49.7 us.)
ROUTER_GEMV_MAX_TOKENS = 8


def router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [T, H] (any float dtype, contiguous), weight [E, H] float32 -> logits [T, E] float32 = x.float() @ W^T in
    one launch (instead of a cast, cuBLAS's float32 GEMV and its reduction: three launches at decode sizes)."""
    t, h = x.shape
    e = weight.shape[0]
    if t > ROUTER_GEMV_MAX_TOKENS or not weight.is_contiguous():
        return torch.nn.functional.linear(x.float(), weight)
    out = torch.empty(t, e, dtype=torch.float32, device=x.device)
    if t:
        # one expert row per program, its whole row in one load (up to 4096 wide): many short programs in flight
        width = min(4096, triton.next_power_of_2(h))
        _router_logits[(t, e)](x.contiguous(), weight, out, e, h, BLOCK_E=1, BLOCK_K=width, num_warps=4,
                                       **pdl.launch())
    return out


# Widest row whose norm folds into the GEMV after it: the statistic is one NORM_BLOCK-wide reduction per program, as
# in _add_rms_norm (same order, same bits), held in registers beside the weight tile.
NORM_FOLD_MAX = 8192


def router_logits_norm(x: torch.Tensor, delta: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                       weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """add_rms_norm(x, delta, norm_weight, eps) then router_logits(h, weight), in one launch at decode sizes: x, delta
    [T, H] contiguous -> (x' = x + delta [T, H], h = rmsnorm(x') * norm_weight [T, H], logits [T, E] float32), the
    same bits as the pair. Every program normalises its row itself (from L2; 4-12 KB); program (t, 0) stores x', h."""
    t, n = x.shape
    e = weight.shape[0]
    if t > ROUTER_GEMV_MAX_TOKENS or n > NORM_FOLD_MAX or not t:
        x, h = add_rms_norm(x, delta, norm_weight, eps)
        return x, h, router_logits(h, weight)
    x = x.contiguous()
    out = torch.empty(t, e, dtype=torch.float32, device=x.device)
    h = torch.empty_like(x)
    summed = torch.empty_like(x) if delta is not None else x
    d = delta.contiguous() if delta is not None else x
    # As router_logits: one expert row per program. H200 (small_kernels.py, us per layer): 2.08; 2 / 4 experts per
    # program (fewer programs re-normalising the row) 1.99 / 3.22: too little for a second path, removed.
    width = min(4096, triton.next_power_of_2(n))
    _router_logits_norm[(t, e)](x, d, norm_weight, summed, h, weight, out, e, n, eps, ADD=delta is not None,
                                NORM_BLOCK=triton.next_power_of_2(n), BLOCK_E=1, BLOCK_K=width, num_warps=4,
                                **pdl.launch())
    return summed, h, out
