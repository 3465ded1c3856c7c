"""The Triton kernels of fused_moe.py (see there for the data flow): a grouped GEMM over row blocks of one expert,
and a GEMV for a few tokens. Both take bf16/fp16 weights, or weight-only quantized ones (QUANT: int8 or fp8 e4m3
with float32 scales [E, N, G], quant.py), converted to the activations' dtype in registers: int8 and e4m3 values are
exact in bf16, so the only rounding is the one the bf16 kernel already has, and HBM traffic is half of bf16's.
(Measured on the H200: a variant multiplying in fp16, activations clamped and converted, was no faster for fp8 and
1.5x slower for int8 at 64 tokens; the in-register conversion, not HBM, now bounds the quantized GEMM at decode.)

Scales: GROUP_K 0 = one scale per output channel, applied once to the accumulator after the K loop (free); else one
per GROUP_K columns (DeepSeek's 128x128 FP8 blocks), applied to each K step's partial product (GROUP_K is a multiple
of BLOCK_K, so a K step never straddles two scale groups).

INT4 (int4_kernels.py; quant.py's packing: byte j of a row's 128-column block p = column 128p + j in the low nibble,
128p + 64 + j in the high one; GROUP_K columns per scale, ZP: with zero points): a quarter of bf16's weight bytes.
The GEMM steps K one block at a time: a [64, BN] byte tile, its nibbles two [64, BN] tiles of codes (exact in
bf16/fp16) for dots against the activations' two halves of the block, the group scales on the partial products. The
GEMV loads [BN, BLOCK_K / 128, 64] bytes per step (BLOCK_K a multiple of 128) and sums in float32 as the bf16 GEMV.
"""

from __future__ import annotations

import triton
import triton.language as tl

from moemesh.runtime.gpu.pdl import enter

from moemesh.runtime.gpu.int4_dp4a import _int4_mac_i8
from moemesh.runtime.gpu.int4_kernels import _int4_gemv_loop, _int4_mac


@triton.jit
def _moe_gemm(a_ptr, b_ptr, c_ptr, weight_ptr, sorted_ptr, expert_ptr, rows_used_ptr, scale_ptr, zero_ptr,
              num_pairs, em, n_out, k_in, stride_am, stride_be, stride_bn, stride_cm, stride_se, stride_sn, up_rows,
              A_DIV: tl.constexpr, GATED: tl.constexpr, WEIGHTED: tl.constexpr, EVEN_K: tl.constexpr,
              QUANT: tl.constexpr, GROUP_K: tl.constexpr, INT4: tl.constexpr, ZP: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
              PDL: tl.constexpr = False, MAGIC: tl.constexpr = False, I8: tl.constexpr = 0):
    """C[pair] = A[pair // A_DIV] @ B_e^T (B [E, n_out (+ up_rows), k_in], k contiguous), per row block of one expert.
    GATED: C = silu(A @ gate^T) * (A @ up^T), up rows start at up_rows. WEIGHTED: C *= weight[pair]. I8 (int4): 1 / 2
    int4_dp4a._int4_mac_i8's K step, in plain Triton (the interpreter) / with inline PTX."""
    enter(PDL)  # PDL: launch the next kernel early, wait for the last (pdl.py)
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(em, BLOCK_M), tl.cdiv(n_out, BLOCK_N)
    group = GROUP_M * num_n  # programs sharing a group of row blocks walk n first (L2 reuse of A)
    first_m = (pid // group) * GROUP_M
    group_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_m
    pid_n = (pid % group) // group_m
    if pid_m * BLOCK_M >= tl.load(rows_used_ptr):
        return  # past the padded rows in use this step (the grid is sized for the worst case)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ptr + rows)  # [BM] int64; num_pairs marks padding
    row_ok = pair < num_pairs
    expert = tl.load(expert_ptr + pid_m)
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    col_ok = cols < n_out
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (pair // A_DIV)[:, None] * stride_am + ks[None, :]  # [BM, BK]
    b_ptrs = b_ptr + expert * stride_be + cols[None, :] * stride_bn + ks[:, None]  # [BK, BN]
    s_ptrs = scale_ptr + expert * stride_se + cols * stride_sn  # [BN] scales of these output channels
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if INT4:  # one 128-column packing block per K step (int4_kernels.py)
        a_rows = a_ptr + (pair // A_DIV) * stride_am  # [BM]
        b_cols = b_ptr + expert * stride_be + cols * stride_bn  # [BN] packed rows
        z_ptrs = zero_ptr + expert * stride_se + cols * stride_sn  # [BN] zero points (ZP), laid out as the scales
        up = up_rows * stride_sn
        for k0 in range(0, k_in, 128):
            if I8 > 0 and GROUP_K == 128 and not ZP:  # int8 tensor cores, activations rounded (int4_dp4a.py)
                acc = _int4_mac_i8(acc, a_rows, b_cols, s_ptrs, row_ok, col_ok, k0, k_in, I8 == 2)
                if GATED:
                    acc_up = _int4_mac_i8(acc_up, a_rows, b_cols + up_rows * stride_bn, s_ptrs + up, row_ok, col_ok,
                                          k0, k_in, I8 == 2)
            else:
                acc = _int4_mac(acc, a_rows, b_cols, s_ptrs, z_ptrs, row_ok, col_ok, k0, k_in, GROUP_K, ZP, MAGIC)
                if GATED:
                    acc_up = _int4_mac(acc_up, a_rows, b_cols + up_rows * stride_bn, s_ptrs + up, z_ptrs + up,
                                       row_ok, col_ok, k0, k_in, GROUP_K, ZP, MAGIC)
    else:
        acc, acc_up = _gemm_loop(acc, acc_up, a_ptrs, b_ptrs, s_ptrs, row_ok, col_ok, ks, k_in, stride_bn, stride_sn,
                                 up_rows, GATED, EVEN_K, QUANT, GROUP_K, BLOCK_K)
    if QUANT and GROUP_K == 0:  # per-channel scales: once, on the float32 accumulators
        acc = acc * tl.load(s_ptrs, mask=col_ok, other=0.0)[None, :]
        if GATED:
            acc_up = acc_up * tl.load(s_ptrs + up_rows * stride_sn, mask=col_ok, other=0.0)[None, :]
    if GATED:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up  # silu(gate) * up, in float32 before the one rounding
    if WEIGHTED:
        acc = acc * tl.load(weight_ptr + pair, mask=row_ok, other=0.0)[:, None]
    c_ptrs = c_ptr + pair[:, None] * stride_cm + cols[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _gemm_loop(acc, acc_up, a_ptrs, b_ptrs, s_ptrs, row_ok, col_ok, ks, k_in, stride_bn, stride_sn, up_rows,
               GATED: tl.constexpr, EVEN_K: tl.constexpr, QUANT: tl.constexpr, GROUP_K: tl.constexpr,
               BLOCK_K: tl.constexpr):
    """The K loop of _moe_gemm for bf16/fp16, int8 and fp8 weights: a_ptrs [BM, BK], b_ptrs [BK, BN] at k = 0."""
    for k0 in range(0, k_in, BLOCK_K):
        k_ok = ks < k_in - k0
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=col_ok[None, :], other=0.0)
        else:
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = _mac(acc, a, b, s_ptrs, col_ok, k0, QUANT, GROUP_K)
        if GATED:
            up_ptrs = b_ptrs + up_rows * stride_bn
            if EVEN_K:
                u = tl.load(up_ptrs, mask=col_ok[None, :], other=0.0)
            else:
                u = tl.load(up_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc_up = _mac(acc_up, a, u, s_ptrs + up_rows * stride_sn, col_ok, k0, QUANT, GROUP_K)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    return acc, acc_up


@triton.jit
def _mac(acc, a, b, s_ptrs, col_ok, k0, QUANT: tl.constexpr, GROUP_K: tl.constexpr):
    """acc [BM, BN] += a [BM, BK] @ b [BK, BN]; quantized b converted to a's dtype, block scale applied here."""
    if QUANT:
        b = b.to(a.dtype)
    if GROUP_K > 0:
        acc = acc + tl.dot(a, b) * tl.load(s_ptrs + k0 // GROUP_K, mask=col_ok, other=0.0)[None, :]
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _gemv_loop(acc, acc_up, a_row, w_rows, s_rows, col_ok, k_in, stride_bn, stride_sn, up_rows,
               GATED: tl.constexpr, GROUP_K: tl.constexpr, BLOCK_K: tl.constexpr, K_STATIC: tl.constexpr = 0):
    """The K loop of _moe_gemv for bf16/fp16, int8 and fp8 weights: w_rows [BN, 1] row pointers, s_rows [BN].
    K_STATIC = K > 0: unrolled at compile time (every step's loads may issue before the first step's math)."""
    if K_STATIC > 0:
        for k0 in tl.static_range(0, K_STATIC, BLOCK_K):
            acc, acc_up = _gemv_step(acc, acc_up, a_row, w_rows, s_rows, col_ok, k0, K_STATIC, stride_bn, stride_sn,
                                     up_rows, GATED, GROUP_K, BLOCK_K)
    else:
        for k0 in range(0, k_in, BLOCK_K):
            acc, acc_up = _gemv_step(acc, acc_up, a_row, w_rows, s_rows, col_ok, k0, k_in, stride_bn, stride_sn,
                                     up_rows, GATED, GROUP_K, BLOCK_K)
    return acc, acc_up


@triton.jit
def _gemv_step(acc, acc_up, a_row, w_rows, s_rows, col_ok, k0, k_in, stride_bn, stride_sn, up_rows,
               GATED: tl.constexpr, GROUP_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """One K step of _gemv_loop: columns k0 .. k0 + BLOCK_K."""
    ks = tl.arange(0, BLOCK_K)
    k_ok = ks + k0 < k_in
    x = tl.load(a_row + k0 + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :]  # [1, BK]
    mask = col_ok[:, None] & k_ok[None, :]
    part = tl.sum(tl.load(w_rows + k0 + ks[None, :], mask=mask, other=0.0).to(tl.float32) * x, 1)
    if GROUP_K > 0:
        part = part * tl.load(s_rows + k0 // GROUP_K, mask=col_ok, other=0.0)
    acc += part
    if GATED:
        up = tl.load(w_rows + up_rows * stride_bn + k0 + ks[None, :], mask=mask, other=0.0)
        part_up = tl.sum(up.to(tl.float32) * x, 1)
        if GROUP_K > 0:
            part_up = part_up * tl.load(s_rows + up_rows * stride_sn + k0 // GROUP_K, mask=col_ok, other=0.0)
        acc_up += part_up
    return acc, acc_up


@triton.jit
def _moe_gemv(a_ptr, b_ptr, c_ptr, weight_ptr, ids_ptr, scale_ptr, zero_ptr, n_out, k_in, stride_am, stride_be,
              stride_bn, stride_cm, stride_se, stride_sn, up_rows, A_DIV: tl.constexpr, GATED: tl.constexpr,
              WEIGHTED: tl.constexpr, QUANT: tl.constexpr, GROUP_K: tl.constexpr, SUM_SLOTS: tl.constexpr,
              INT4: tl.constexpr, ZP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              ZERO_N: tl.constexpr = 0, PDL: tl.constexpr = False, K_STATIC: tl.constexpr = 0,
              WORDS: tl.constexpr = 0):
    """Few tokens (decode at batch 1-4): one program per (pair, column block), a dot product per output column, no
    alignment and no tensor cores; many more programs in flight than the row-block GEMM has at this size.
    SUM_SLOTS K > 0: add the row into c[pair // K] (float32, zeroed by the caller) instead of storing c[pair]: the
    per-token sum over slots without a reduction launch (a handful of atomic adds per address).
    ZERO_N > 0 (not WEIGHTED): also zero the ZERO_N float32 values at weight_ptr, the next launch's SUM_SLOTS
    accumulator (a memset launch less per layer; the first ZERO_N / 256 programs take 256 values each)."""
    enter(PDL)  # PDL: launch the next kernel early, wait for the last (pdl.py)
    pair, cols, col_ok, expert = _gemv_start(weight_ptr, ids_ptr, n_out, BLOCK_N, ZERO_N)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if expert >= 0:  # hosted elsewhere (-1): the row stays zero
        a_row = a_ptr + (pair // A_DIV) * stride_am
        s_rows = scale_ptr + expert * stride_se + cols * stride_sn  # [BN]
        if INT4:
            w_packed = b_ptr + expert * stride_be + cols * stride_bn  # [BN] packed rows
            z_rows = zero_ptr + expert * stride_se + cols * stride_sn  # [BN] zero points (ZP)
            acc, acc_up = _int4_gemv_loop(acc, acc_up, a_row, w_packed, s_rows, z_rows, col_ok, k_in, stride_bn,
                                          stride_sn, up_rows, GATED, BLOCK_N, BLOCK_K, GROUP_K, ZP, K_STATIC, WORDS)
        else:
            w_rows = b_ptr + expert * stride_be + cols[:, None] * stride_bn  # [BN, 1]
            acc, acc_up = _gemv_loop(acc, acc_up, a_row, w_rows, s_rows, col_ok, k_in, stride_bn, stride_sn, up_rows,
                                     GATED, GROUP_K, BLOCK_K, K_STATIC)
        if QUANT and GROUP_K == 0:
            acc = acc * tl.load(s_rows, mask=col_ok, other=0.0)
            if GATED:
                acc_up = acc_up * tl.load(s_rows + up_rows * stride_sn, mask=col_ok, other=0.0)
        acc = _gate_weigh(acc, acc_up, weight_ptr, pair, GATED, WEIGHTED)
    if SUM_SLOTS > 0:
        _add_slots(acc, c_ptr, pair, cols, col_ok, expert, stride_cm, SUM_SLOTS)
    else:
        tl.store(c_ptr + pair * stride_cm + cols, acc.to(c_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def _gemv_start(weight_ptr, ids_ptr, n_out, BLOCK_N: tl.constexpr, ZERO_N: tl.constexpr):
    """The few-token GEMVs' first lines (this kernel's and int4_q8's): ZERO_N > 0, zero the next launch's ZERO_N
    float32 accumulator values at weight_ptr; then (pair, cols [BN] int64, col_ok, expert id) of this program."""
    if ZERO_N > 0:
        z = (tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)) * 256 + tl.arange(0, 256)
        tl.store(weight_ptr + z, tl.zeros((256,), dtype=tl.float32), mask=z < ZERO_N)
    pair = tl.program_id(0).to(tl.int64)
    cols = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    return pair, cols, cols < n_out, tl.load(ids_ptr + pair)


@triton.jit
def _gate_weigh(acc, acc_up, weight_ptr, pair, GATED: tl.constexpr, WEIGHTED: tl.constexpr):
    """A GEMV row's epilogue math: GATED, silu(gate) * up in float32; WEIGHTED, times the pair's routing weight."""
    if GATED:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up
    if WEIGHTED:
        acc = acc * tl.load(weight_ptr + pair)
    return acc


@triton.jit
def _add_slots(acc, c_ptr, pair, cols, col_ok, expert, stride_cm, SUM_SLOTS: tl.constexpr):
    """acc [BN] added into float32 c[pair // SUM_SLOTS, cols] (the token's row), unless the expert is elsewhere."""
    hosted = tl.where(col_ok, expert, -1) >= 0  # = col_ok & (expert >= 0), as a tensor (Triton's interpreter)
    tl.atomic_add(c_ptr + (pair // SUM_SLOTS) * stride_cm + cols, acc, mask=hosted, sem="relaxed")

