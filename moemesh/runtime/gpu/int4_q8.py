"""The few-token int4 expert GEMVs on activations quantized once per row (symmetric groups of 128 weights, dp4a).

int4_dp4a's GEMV rounds the activations to int8 inside every program: at one token each of gate_up's 768 programs
re-reads and re-rounds the same 2,048 values (and down's 1,024 programs the same 768 per slot), with the reshapes and
layout changes that costs. Here the rounding happens once, where the values are made:

    hidden [T, H] -> quantize_rows: xq [T, H] int8, xs [T, H / G] float32   # one step (absmax / 127) per G columns
    gate_up:  act = silu(x @ gate^T) * (x @ up^T) from xq, xs               # _int4_q8_gemv, GATED
              -> its own BLOCK_N outputs rounded in the epilogue: aq [P, I] int8, as [P, I / BLOCK_N]
    down:     out[t] += w[p] * (act[p] @ down^T) from aq, as                  # _int4_q8_gemv, SUM_SLOTS

A weight word holds 8 codes (int4_kernels: word i of a 128-column block = columns 4i..4i+3 in its low nibbles,
64 + 4i.. in its high ones); the int8 row viewed as int32 words holds columns 4j..4j+3 in word j, so word i of a
block's low half meets activation word 32p + i and its high half word 32p + 16 + i: one dp4a each, no repacking.
Per group g of G columns: sum_k (c_k - 8) * x_k ~= (dot_g - 8 * sum(q_g)) * step_g, the sums exact in int32.

H200, one token, both GEMVs in a PDL graph (benchmarks/results/int4-q8-h200.md), us per layer: 14.46 -> 12.98
(quantize_rows included); their weight loads alone take 9.77. Output 0.87% from int4_dp4a's (itself ~1.2% from
float activations). Measured and dropped: down for one token as 128 programs owning 16 columns each for all slots,
rows prefetched into L2 before the PDL wait: 18.0-24.7 us for the chain; gate_up's programs prefetching their
expert's down rows into L2 (prefetch.global.L2, 64 lines each): before their own loads 14.03, after their math 12.81
against 12.97 (noise). Dropped 2026-12-01: quantize_rows folded into the post-attention norm's launch
(fused_ops.router_logits_norm's program (t, 0) rounding h as it stores it, the rows riding on h to moe_q8): 48-layer
graph replay at batch 1 1.87 / 1.87 ms without, 1.85 / 1.85 with (alternated, one call): 0.4 us a layer, PDL having
hidden most of the launch, for a side channel through dispatch, bank and backbone.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from moemesh.runtime.gpu.int4_dp4a import _dp4a, _round
from moemesh.runtime.gpu.int4_kernels import _int4_words
from moemesh.runtime.gpu.moe_kernels import _add_slots, _gate_weigh, _gemv_start
from moemesh.runtime.gpu import pdl
from moemesh.runtime.gpu.pdl import enter
from moemesh.runtime.quant import QuantTensor

Weight = torch.Tensor | QuantTensor


@triton.jit
def _q8_dot(words, xq_row, xs_row, s_rows, col_ok, k0, K: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_K: tl.constexpr, G: tl.constexpr, ASM: tl.constexpr):
    """[BN] float32 sums over columns k0 .. k0 + BLOCK_K of W[n, k] * x[k] from words [BN, NG, 16] (_int4_words), x
    given as int32 words of int8 values (xq_row) and one float32 step per G columns (xs_row)."""
    NG: tl.constexpr = BLOCK_K // 128
    S: tl.constexpr = 64 // G  # step groups per half block
    W: tl.constexpr = G // 4  # words per group
    blk = k0 // 128 + tl.arange(0, NG)  # [NG]
    blk_ok = blk < K // 128
    xw = xq_row + (blk * 32)[:, None] + tl.arange(0, 16)[None, :]  # [NG, 16] low halves' words (high: + 16)
    x_lo = tl.load(xw, mask=blk_ok[:, None], other=0)
    x_hi = tl.load(xw + 16, mask=blk_ok[:, None], other=0)
    sg = (blk * (128 // G))[:, None] + tl.arange(0, S)[None, :]  # [NG, S] step index of each low group
    s_lo = tl.load(xs_row + sg, mask=blk_ok[:, None], other=0.0)
    s_hi = tl.load(xs_row + sg + S, mask=blk_ok[:, None], other=0.0)
    ones = tl.full((NG, 16), 0x01010101, tl.int32)
    n_lo = tl.sum(tl.reshape(_dp4a(ones, x_lo, 0, ASM), (NG, S, W)), 2)  # [NG, S] sum of q per group
    n_hi = tl.sum(tl.reshape(_dp4a(ones, x_hi, 0, ASM), (NG, S, W)), 2)
    d_lo = tl.sum(tl.reshape(_dp4a(words, x_lo[None, :, :], 0, ASM), (BLOCK_N, NG, S, W)), 3)  # [BN, NG, S]
    d_hi = tl.sum(tl.reshape(_dp4a(words, x_hi[None, :, :], 4, ASM), (BLOCK_N, NG, S, W)), 3)
    part = tl.sum((d_lo - 8 * n_lo[None, :, :]).to(tl.float32) * s_lo[None, :, :]
                  + (d_hi - 8 * n_hi[None, :, :]).to(tl.float32) * s_hi[None, :, :], 2)  # [BN, NG]
    scale = tl.load(s_rows[:, None] + blk[None, :], mask=col_ok[:, None] & blk_ok[None, :], other=0.0)
    return tl.sum(part * scale, 1)


@triton.jit
def _int4_q8_gemv(xq_ptr, xs_ptr, b_ptr, c_ptr, weight_ptr, ids_ptr, scale_ptr, cs_ptr, n_out, stride_xq, stride_xs,
                  stride_be, stride_bn, stride_cm, stride_se, stride_sn, stride_cs, up_rows, K: tl.constexpr,
                  A_DIV: tl.constexpr, GATED: tl.constexpr, WEIGHTED: tl.constexpr, SUM_SLOTS: tl.constexpr,
                  Q_OUT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, G: tl.constexpr,
                  ASM: tl.constexpr, ZERO_N: tl.constexpr = 0, PDL: tl.constexpr = False):
    """One program per (pair, BLOCK_N output columns): C[pair] = x[pair // A_DIV] @ W_e^T over int4 rows (GATED:
    silu(gate) * up, up rows from up_rows; WEIGHTED: times weight[pair]). Out: SUM_SLOTS K > 0, added into float32
    c[pair // K] (zeroed before; ZERO_N: this launch zeroes the next one's ZERO_N values at weight_ptr); Q_OUT, the
    columns rounded to int8 (c int8) with their step (absmax / 127 of the BLOCK_N columns) at cs[pair, block];
    else stored in c's dtype."""
    enter(PDL)  # PDL: launch the next kernel early, wait for the last (pdl.py)
    pair, cols, col_ok, expert = _gemv_start(weight_ptr, ids_ptr, n_out, BLOCK_N, ZERO_N)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if expert >= 0:  # hosted elsewhere (-1): the row stays zero
        acc_up = tl.zeros((BLOCK_N,), dtype=tl.float32)
        xq_row = xq_ptr.to(tl.pointer_type(tl.int32)) + (pair // A_DIV) * (stride_xq // 4)
        xs_row = xs_ptr + (pair // A_DIV) * stride_xs
        w_rows = b_ptr + expert * stride_be + cols * stride_bn  # [BN] packed rows
        s_rows = scale_ptr + expert * stride_se + cols * stride_sn  # [BN]
        for k0 in tl.static_range(0, K, BLOCK_K):  # unrolled: every step's loads issue before the first dot
            words = _int4_words(w_rows, col_ok, k0, K, BLOCK_K)
            if GATED:
                words_up = _int4_words(w_rows + up_rows * stride_bn, col_ok, k0, K, BLOCK_K)
                acc_up += _q8_dot(words_up, xq_row, xs_row, s_rows + up_rows * stride_sn, col_ok, k0, K, BLOCK_N,
                                  BLOCK_K, G, ASM)
            acc += _q8_dot(words, xq_row, xs_row, s_rows, col_ok, k0, K, BLOCK_N, BLOCK_K, G, ASM)
        acc = _gate_weigh(acc, acc_up, weight_ptr, pair, GATED, WEIGHTED)
    if SUM_SLOTS > 0:
        _add_slots(acc, c_ptr, pair, cols, col_ok, expert, stride_cm, SUM_SLOTS)
    elif Q_OUT:
        amax = tl.max(tl.where(col_ok, tl.abs(acc), 0.0), 0)
        step = tl.where(amax > 0, amax / 127.0, 1.0)
        tl.store(c_ptr + pair * stride_cm + cols, _round(acc / step).to(tl.int8), mask=col_ok)
        tl.store(cs_ptr + pair * stride_cs + tl.program_id(1), step)
    else:
        tl.store(c_ptr + pair * stride_cm + cols, acc.to(c_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def _quantize_rows(x_ptr, xq_ptr, xs_ptr, stride_x, stride_xq, stride_xs, K: tl.constexpr, KP: tl.constexpr,
                   G: tl.constexpr, PDL: tl.constexpr = False):
    """Row r of x [R, K] -> xq[r] int8 and xs[r, K / G] float32 steps (absmax / 127 per G columns)."""
    enter(PDL)
    r = tl.program_id(0).to(tl.int64)
    k = tl.arange(0, KP)
    x = tl.load(x_ptr + r * stride_x + k, mask=k < K, other=0.0).to(tl.float32)
    groups = tl.reshape(x, (KP // G, G))
    amax = tl.max(tl.abs(groups), 1)  # [KP / G]
    step = tl.where(amax > 0, amax / 127.0, 1.0)
    q = tl.reshape(_round(groups / step[:, None]), (KP,))
    tl.store(xq_ptr + r * stride_xq + k, q.to(tl.int8), mask=k < K)
    g = tl.arange(0, KP // G)
    tl.store(xs_ptr + r * stride_xs + g, step, mask=g < K // G)


def quantize_rows(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, K] (K a multiple of 128) -> (xq [R, K] int8, xs [R, K / group] float32), one launch."""
    r, k = x.shape
    xq = torch.empty(r, k, dtype=torch.int8, device=x.device)
    xs = torch.empty(r, k // group, dtype=torch.float32, device=x.device)
    if r:
        _quantize_rows[(r,)](x, xq, xs, x.stride(0), xq.stride(0), xs.stride(0), K=k, KP=triton.next_power_of_2(k),
                             G=group, num_warps=4, **pdl.launch())
    return xq, xs


def q8_gemv(xq: torch.Tensor, xs: torch.Tensor, w: QuantTensor, ids: torch.Tensor, a_div: int, cfg: dict,
            out: torch.Tensor, out_steps: torch.Tensor | None = None, weights: torch.Tensor | None = None,
            up_rows: int = 0, sum_slots: int = 0, zero: torch.Tensor | None = None) -> torch.Tensor:
    """One launch of _int4_q8_gemv over int4 weights w [E, N, K / 2] (symmetric, groups of 128): xq [R, K] int8 and
    xs [R, K / G] from quantize_rows or an earlier q8_gemv with out_steps; out [P, n_out] (int8 with out_steps
    [P, n_out / BLOCK_N]; float32 [P / K, n_out] with sum_slots K, zeroed before, or by the launch before through
    its zero)."""
    n_out, k_in = out.shape[1], xq.shape[1]
    grid = (ids.numel(), triton.cdiv(n_out, cfg["BLOCK_N"]))
    zero_n = zero.numel() if zero is not None else 0
    if zero_n > grid[0] * grid[1] * 256:
        raise ValueError(f"cannot zero {zero_n} values with {grid} programs")
    steps = out_steps if out_steps is not None else xs
    _int4_q8_gemv[grid](
        xq, xs, w.q, out, weights if weights is not None else zero if zero is not None else out, ids, w.scale, steps,
        n_out, xq.stride(0), xs.stride(0), w.q.stride(0), w.q.stride(1), out.stride(0), w.scale.stride(0),
        w.scale.stride(1), steps.stride(0), up_rows, K=k_in, A_DIV=a_div, GATED=up_rows > 0,
        WEIGHTED=weights is not None, SUM_SLOTS=sum_slots, Q_OUT=out_steps is not None, BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"], G=k_in // xs.shape[1], ASM=os.environ.get("TRITON_INTERPRET") != "1", ZERO_N=zero_n,
        num_warps=cfg["num_warps"], num_stages=cfg.get("num_stages", 2), **pdl.launch())
    return out


def plain(w: Weight) -> bool:
    """Whether w is int4 the q8 GEMVs read: symmetric, one scale per 128 columns."""
    return isinstance(w, QuantTensor) and w.scheme == "int4" and w.zero is None and w.block_k == 128


def usable(hidden: torch.Tensor, w_gate_up: Weight, w_down: Weight, cfg_gate_up: dict) -> bool:
    """Whether moe_q8 takes these weights: both plain(), H and I whole 128-column blocks, and gate_up's BLOCK_N
    (the step group of act) a power of two from 8 to 64 dividing I."""
    bn, inter = cfg_gate_up["BLOCK_N"], w_down.shape[2]
    return (plain(w_gate_up) and plain(w_down) and hidden.shape[1] % 128 == 0 and inter % 128 == 0
            and bn in (8, 16, 32, 64) and inter % bn == 0)


def moe_q8(hidden: torch.Tensor, w_gate_up: QuantTensor, w_down: QuantTensor, ids: torch.Tensor,
           weights: torch.Tensor, cfg_gate_up: dict, cfg_down: dict) -> torch.Tensor:
    """fused_moe's few-token path on q8 activations: hidden [T, H], ids [T * K] local expert ids (-1: elsewhere),
    weights [T * K] float32 -> [T, H] float32. Three launches: quantize_rows (a step per cfg_gate_up["G"] columns),
    gate_up (act rounded per its BLOCK_N columns in its epilogue, out zeroed), down (slots summed into out)."""
    t, inter = hidden.shape[0], w_down.shape[2]
    if not t:
        return torch.zeros(0, hidden.shape[1], dtype=torch.float32, device=hidden.device)
    k = ids.numel() // t
    xq, xs = quantize_rows(hidden.contiguous(), cfg_gate_up["G"])
    aq = torch.empty(ids.numel(), inter, dtype=torch.int8, device=hidden.device)  # [P, I]
    steps = torch.empty(ids.numel(), inter // cfg_gate_up["BLOCK_N"], dtype=torch.float32, device=hidden.device)
    out = torch.empty(t, hidden.shape[1], dtype=torch.float32, device=hidden.device)  # [T, H], zeroed by gate_up
    q8_gemv(xq, xs, w_gate_up, ids, k, cfg_gate_up, aq, out_steps=steps, up_rows=inter, zero=out)
    return q8_gemv(aq, steps, w_down, ids, 1, cfg_down, out, weights=weights, sum_slots=k)
