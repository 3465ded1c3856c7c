"""The int4 MoE layer at a few dozen tokens (decode at batch 32-128 on the H200): each expert's weights read once
for all the pairs routed to it, on integer dot products (int4_dp4a.py), instead of the row-block GEMM.

At 64 tokens x top-8 over 128 experts an expert gets ~4 pairs: the GEMM's 16-row tensor-core tiles are mostly
padding and its in-register dequantization bounds it (one layer 231 us, against 76 us of int4 weight bytes at HBM's
rate); the GEMV (int4_dp4a) would read every expert once per pair (4x the bytes). Here the pairs are sorted by expert
(moe_align, BLOCK_M rows per block, one expert per block) and a program decodes one [BN, BLOCK_K] weight tile once,
then runs dp4a against each of its block's rows; padding rows are skipped:

    sorted_ids [EM] (pairs by expert; P = padding), block_expert [EM / BM]
    program (row block b, column block n): words [BN, BK / 128, 16] of expert block_expert[b], once per K step
      for each row r of b with pair p < P:  acc[r] += dp4a(words, int8 a[p // A_DIV])          # [BM, BN] float32
    -> GATED: act[p] = silu(gate) * up          | WEIGHTED + SUM_SLOTS: out[p // K] += weight[p] * acc (atomics)
"""

from __future__ import annotations

import triton
import triton.language as tl

from moemesh.runtime.gpu.int4_dp4a import _int4_dp4a_dot
from moemesh.runtime.gpu.int4_kernels import _int4_words
from moemesh.runtime.gpu.pdl import enter


@triton.jit
def _int4_rows(a_ptr, b_ptr, c_ptr, weight_ptr, sorted_ptr, expert_ptr, rows_used_ptr, scale_ptr, num_pairs, n_out,
               stride_am, stride_be, stride_bn, stride_cm, stride_se, stride_sn, up_rows, A_DIV: tl.constexpr,
               GATED: tl.constexpr, WEIGHTED: tl.constexpr, SUM_SLOTS: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_STATIC: tl.constexpr, ASM: tl.constexpr,
               SUB: tl.constexpr, ZERO_N: tl.constexpr = 0, PDL: tl.constexpr = False):
    """See the module doc; arguments as fused_moe's _moe_gemm / _moe_gemv (ZERO_N: also zero ZERO_N float32 values
    at weight_ptr, the next launch's SUM_SLOTS rows; the first ZERO_N / 256 programs take 256 each)."""
    enter(PDL)  # PDL: launch the next kernel early, wait for the last (pdl.py)
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    if ZERO_N > 0:
        z = (pid_m * tl.num_programs(1) + pid_n) * 256 + tl.arange(0, 256)
        tl.store(weight_ptr + z, tl.zeros((256,), dtype=tl.float32), mask=z < ZERO_N)
    if pid_m * BLOCK_M >= tl.load(rows_used_ptr):
        return  # past the padded rows in use this step (the grid is sized for the worst case)
    expert = tl.load(expert_ptr + pid_m)
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    col_ok = cols < n_out
    w_rows = b_ptr + expert * stride_be + cols * stride_bn  # [BN] packed rows
    s_rows = scale_ptr + expert * stride_se + cols * stride_sn  # [BN]
    rows = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in tl.static_range(0, K_STATIC, BLOCK_K):
        words = _int4_words(w_rows, col_ok, k0, K_STATIC, BLOCK_K)  # [BN, BK / 128, 16], read once for all rows
        if GATED:
            words_up = _int4_words(w_rows + up_rows * stride_bn, col_ok, k0, K_STATIC, BLOCK_K)
        for r in tl.static_range(BLOCK_M):
            pair = tl.load(sorted_ptr + pid_m * BLOCK_M + r)
            if pair < num_pairs:  # a padding row costs nothing
                a_row = a_ptr + (pair // A_DIV) * stride_am
                here = rows[:, None] == r  # [BM, 1]
                part = _int4_dp4a_dot(words, a_row, s_rows, col_ok, k0, K_STATIC, BLOCK_N, BLOCK_K, ASM, SUB)
                acc = tl.where(here, acc + part[None, :], acc)
                if GATED:
                    part = _int4_dp4a_dot(words_up, a_row, s_rows + up_rows * stride_sn, col_ok, k0, K_STATIC,
                                          BLOCK_N, BLOCK_K, ASM, SUB)
                    acc_up = tl.where(here, acc_up + part[None, :], acc_up)
    pairs = tl.load(sorted_ptr + pid_m * BLOCK_M + rows)  # [BM]
    row_ok = pairs < num_pairs
    pairs = tl.where(row_ok, pairs, 0)
    if GATED:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up
    if WEIGHTED:
        acc = acc * tl.load(weight_ptr + pairs, mask=row_ok, other=0.0)[:, None]
    mask = row_ok[:, None] & col_ok[None, :]
    if SUM_SLOTS > 0:
        tl.atomic_add(c_ptr + (pairs // SUM_SLOTS)[:, None] * stride_cm + cols[None, :], acc, mask=mask,
                      sem="relaxed")
    else:
        tl.store(c_ptr + pairs[:, None] * stride_cm + cols[None, :], acc.to(c_ptr.dtype.element_ty), mask=mask)


def launch(a, w, out, weight_arg, al, a_div: int, cfg: dict, up_rows: int = 0, weighted: bool = False,
           sum_slots: int = 0, zero_n: int = 0, asm: bool = True, pdl_args: dict | None = None) -> None:
    """One launch over alignment `al` (BLOCK_M = cfg["BLOCK_M"]); w: an int4 QuantTensor (symmetric, groups of
    128) [E, N (+ up_rows), K]; out [P, N] (GATED) or [P / sum_slots, N] float32 zeroed (by the launch before, or
    zero_n here: weight_arg is then that buffer)."""
    n_out, k_in = out.shape[1], a.shape[1]
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    grid = (max(al.sorted_ids.numel() // bm, 1), triton.cdiv(n_out, bn))
    if zero_n > grid[0] * grid[1] * 256:
        raise ValueError(f"cannot zero {zero_n} values with {grid} programs")
    _int4_rows[grid](
        a, w.q, out, weight_arg, al.sorted_ids, al.block_expert, al.rows_used, w.scale, al.num_pairs, n_out,
        a.stride(0), w.q.stride(0), w.q.stride(1), out.stride(0), w.scale.stride(0), w.scale.stride(1), up_rows,
        A_DIV=a_div, GATED=up_rows > 0, WEIGHTED=weighted, SUM_SLOTS=sum_slots, BLOCK_M=bm, BLOCK_N=bn,
        BLOCK_K=max(128, cfg["BLOCK_K"] // 128 * 128), K_STATIC=k_in, ASM=asm, SUB=2 if cfg.get("DP4A") == 32 else 1,
        ZERO_N=zero_n, num_warps=cfg["num_warps"], num_stages=cfg.get("num_stages", 2), **(pdl_args or {}))
