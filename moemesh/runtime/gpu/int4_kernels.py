"""The int4 parts of the fused MoE kernels (moe_kernels.py calls them when INT4): one K step of the grouped GEMM and
of the GEMV over packed int4 weights, dequantized in registers.

Layout (quant.py): a row holds ceil(K / 128) packing blocks of 64 bytes; byte j of block p holds column 128p + j in
its low nibble and 128p + 64 + j in its high nibble, as a code in [0, 16); w = (code - zero) * scale with one scale
(and, when ZP, one zero point) per GROUP columns, GROUP in {32, 64, 128}; without ZP the zero is 8 (symmetric).
So a block's low nibbles are its first 64 columns and its high nibbles the next 64, each half covering 64 / GROUP
scale groups (or half of one for GROUP 128): every piece of W = min(GROUP, 64) columns is one contiguous byte range
and one scale group.

Symmetric groups of 128 (what `quantize(w, "int4")` makes): codes - 8 go into the dot and the group's scale
multiplies the partial product (the fast path). Otherwise per piece: dot(activations, codes) - zero * sum of the
activations, times the piece's scale (codes 0..15 are exact in bf16/fp16, so the dots stay exact up to the inputs).
"""

from __future__ import annotations

import triton
import triton.language as tl

from moemesh.runtime.gpu.int4_dp4a import _int4_dp4a_dot, _quarters


@triton.jit
def _int4_mac(acc, a_rows, b_cols, s_ptrs, z_ptrs, row_ok, col_ok, k0, k_in,
              GROUP: tl.constexpr, ZP: tl.constexpr, MAGIC: tl.constexpr = False):
    """acc [BM, BN] += A[:, k0:k0+128] @ W[k0:k0+128, :] for one packing block (k0 a multiple of 128): a_rows [BM]
    activation row pointers, b_cols [BN] packed weight row pointers, s_ptrs / z_ptrs [BN] the rows' scales / zeros.
    MAGIC: codes become floats by _magic, a tuned choice per token count (measured on the
    H200, one MoE layer at 16-128 tokens: 13-14% faster with the int4-tuned tiles; at 8 and 4,096 tokens slower)."""
    if GROUP == 128 and not ZP:
        j = tl.arange(0, 64)
        a_lo = tl.load(a_rows[:, None] + k0 + j[None, :], mask=row_ok[:, None] & (j < k_in - k0)[None, :], other=0.0)
        a_hi = tl.load(a_rows[:, None] + k0 + 64 + j[None, :], mask=row_ok[:, None] & (j < k_in - k0 - 64)[None, :],
                       other=0.0)  # [BM, 64]
        b = tl.load(b_cols[None, :] + k0 // 2 + j[:, None], mask=col_ok[None, :], other=0)  # [64, BN] uint8
        if MAGIC:  # A @ (OFFSET + code), then OFFSET + 8 times the row sums off
            part = tl.dot(a_lo, _magic(b & 15, a_lo.dtype))  # columns k0 + j
            part = tl.dot(a_hi, _magic(b >> 4, a_lo.dtype), part)  # columns k0 + 64 + j
            rows = tl.sum(a_lo.to(tl.float32), 1) + tl.sum(a_hi.to(tl.float32), 1)  # [BM]
            part = part - (_offset(a_lo.dtype) + 8.0) * rows[:, None]
        else:
            part = tl.dot(a_lo, ((b & 15).to(tl.int8) - 8).to(a_lo.dtype))  # columns k0 + j
            part = tl.dot(a_hi, ((b >> 4).to(tl.int8) - 8).to(a_lo.dtype), part)  # columns k0 + 64 + j
        acc = acc + part * tl.load(s_ptrs + k0 // 128, mask=col_ok, other=0.0)[None, :]
    else:
        W: tl.constexpr = 64 if GROUP > 64 else GROUP  # columns of one piece
        jw = tl.arange(0, W)
        for h in tl.static_range(64 // W):  # pieces of each half
            b = tl.load(b_cols[None, :] + k0 // 2 + h * W + jw[:, None], mask=col_ok[None, :], other=0)  # [W, BN]
            acc = _int4_piece(acc, a_rows, b & 15, s_ptrs, z_ptrs, row_ok, col_ok, k0 + h * W, k_in, W, GROUP, ZP,
                              MAGIC)
            acc = _int4_piece(acc, a_rows, b >> 4, s_ptrs, z_ptrs, row_ok, col_ok, k0 + 64 + h * W, k_in, W, GROUP,
                              ZP, MAGIC)
    return acc


@triton.jit
def _int4_piece(acc, a_rows, codes, s_ptrs, z_ptrs, row_ok, col_ok, col0, k_in, W: tl.constexpr,
                GROUP: tl.constexpr, ZP: tl.constexpr, MAGIC: tl.constexpr = False):
    """acc += (A[:, col0:col0+W] @ (codes - zero)) * scale for one piece: codes [W, BN] uint8 of columns col0 + j,
    all in scale group col0 // GROUP."""
    jw = tl.arange(0, W)
    a = tl.load(a_rows[:, None] + col0 + jw[None, :], mask=row_ok[:, None] & (jw < k_in - col0)[None, :], other=0.0)
    g = col0 // GROUP
    if MAGIC:  # A @ (OFFSET + code) - (OFFSET + zero) * row sums
        part = tl.dot(a, _magic(codes, a.dtype))  # [BM, BN]
        zero = tl.load(z_ptrs + g, mask=col_ok, other=0.0) if ZP else tl.full((1,), 8.0, tl.float32)  # [BN] or [1]
        part = part - tl.sum(a.to(tl.float32), 1)[:, None] * (_offset(a.dtype) + zero)[None, :]
    elif ZP:
        part = tl.dot(a, codes.to(a.dtype))  # [BM, BN]
        zero = tl.load(z_ptrs + g, mask=col_ok, other=0.0)  # [BN]
        part = part - tl.sum(a.to(tl.float32), 1)[:, None] * zero[None, :]
    else:
        part = tl.dot(a, (codes.to(tl.int8) - 8).to(a.dtype))
    return acc + part * tl.load(s_ptrs + g, mask=col_ok, other=0.0)[None, :]


@triton.jit
def _magic(codes, dtype: tl.constexpr):
    """codes uint8 in [0, 16) -> the same shape in dtype (bf16 or fp16) holding OFFSET + code exactly: the code ORed
    into the mantissa of OFFSET (bf16 128 = 0x4300, fp16 1024 = 0x6400, both with unit spacing), one AND-OR per
    value instead of a subtraction and a conversion. The caller takes OFFSET (and the zero) times the activations'
    row sums off after the dot: products of bf16/fp16 inputs are exact in the float32 accumulator, so what is added
    is its ~2^-24 rounding of terms ~OFFSET times larger (~2^-16 of the row's magnitude; bf16 itself keeps 2^-8)."""
    bits = codes.to(tl.int16) | (0x4300 if dtype == tl.bfloat16 else 0x6400)
    return bits.to(dtype, bitcast=True)


@triton.jit
def _offset(dtype: tl.constexpr):
    """The float _magic adds to every code: 128 for bf16, 1024 for fp16."""
    return 128.0 if dtype == tl.bfloat16 else 1024.0


@triton.jit
def _int4_gemv_step(x_row, w_rows, s_rows, z_rows, col_ok, k0, k_in, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    GROUP: tl.constexpr, ZP: tl.constexpr):
    """[BN] float32: sum over columns k0 .. k0 + BLOCK_K of W[n, k] * x[k] (BLOCK_K a multiple of 128, k0 of
    BLOCK_K); x_row the activation row pointer, w_rows [BN] packed rows, s_rows / z_rows [BN] scales / zeros."""
    NG: tl.constexpr = BLOCK_K // 128
    blk = k0 // 128 + tl.arange(0, NG)  # [NG] packing blocks of this step
    blk_ok = blk < tl.cdiv(k_in, 128)
    j = tl.arange(0, 64)
    lo_k = (blk * 128)[:, None] + j[None, :]  # [NG, 64] columns of the low nibbles (high: + 64)
    x_lo = tl.load(x_row + lo_k, mask=lo_k < k_in, other=0.0).to(tl.float32)
    x_hi = tl.load(x_row + lo_k + 64, mask=lo_k + 64 < k_in, other=0.0).to(tl.float32)
    byte = (blk * 64)[None, :, None] + j[None, None, :]  # [1, NG, 64]
    b = tl.load(w_rows[:, None, None] + byte, mask=col_ok[:, None, None] & blk_ok[None, :, None], other=0)
    if GROUP == 128 and not ZP:
        lo = (b & 15).to(tl.float32) - 8.0  # [BN, NG, 64]
        hi = (b >> 4).to(tl.float32) - 8.0
        part = tl.sum(lo * x_lo[None, :, :] + hi * x_hi[None, :, :], 2)  # [BN, NG]
        scale = tl.load(s_rows[:, None] + blk[None, :], mask=col_ok[:, None] & blk_ok[None, :], other=0.0)
        out = tl.sum(part * scale, 1)
    else:
        out = _int4_gemv_half(b & 15, x_lo, blk * 128, s_rows, z_rows, col_ok, blk_ok, BLOCK_N, NG, GROUP, ZP)
        out += _int4_gemv_half(b >> 4, x_hi, blk * 128 + 64, s_rows, z_rows, col_ok, blk_ok, BLOCK_N, NG, GROUP, ZP)
    return out


@triton.jit
def _int4_words(w_rows, col_ok, k0, k_in, BLOCK_K: tl.constexpr):
    """[BN, BLOCK_K / 128, 16] int32: the packed words of columns k0 .. k0 + BLOCK_K of rows w_rows [BN] (a thread's
    registers hold 8 codes per word rather than one byte per register: 4x the weights in flight per program).
    Masked rows and blocks read 0 and get a zero scale in _int4_words_dot."""
    blk = k0 // 128 + tl.arange(0, BLOCK_K // 128)
    ok = col_ok[:, None, None] & (blk < tl.cdiv(k_in, 128))[None, :, None]
    return tl.load(w_rows.to(tl.pointer_type(tl.int32))[:, None, None] + (blk * 16)[None, :, None]
                   + tl.arange(0, 16)[None, None, :], mask=ok, other=0)


@triton.jit
def _int4_words_dot(words, x_row, s_rows, col_ok, k0, k_in, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    ASM: tl.constexpr):
    """[BN] float32 sums over columns k0 .. k0 + BLOCK_K of W[n, k] * x[k] from _int4_words (GROUP 128, symmetric).
    Word i of packing block p is bytes 4i .. 4i+3: byte m's low nibble (bits 8m) is column 128p + 4i + m, its high
    nibble (bits 8m + 4) column 128p + 64 + 4i + m.

    Each code c becomes a float with one AND-OR (no shift for two of the eight, one shared shift for the others, no
    int-to-float conversion, which Hopper issues at a quarter of the FMA rate): the nibble placed at mantissa bit
    q (12 or 16) of 1.0 reads v = 1 + c * 2^(q - 23). With x' = x * 2^(23 - q) (per column, shared by every row),
    v * x' = x' + c * x, so one FMA per code gives sum(x') + sum(c * x), and sum((c - 8) * x) = that - sum(x') -
    8 * sum(x), both sums taken once per program. float32 keeps ~2^-16 of sum|x| (the x' terms are at most 2^11 x):
    well inside bf16's 2^-8.
    """
    NG: tl.constexpr = BLOCK_K // 128
    blk = k0 // 128 + tl.arange(0, NG)  # [NG] packing blocks of this step
    col = (blk * 128)[:, None] + tl.arange(0, 64)[None, :]  # [NG, 64] columns of the low nibbles
    x_lo = tl.load(x_row + col, mask=col < k_in, other=0.0).to(tl.float32)
    x_hi = tl.load(x_row + col + 64, mask=col + 64 < k_in, other=0.0).to(tl.float32)
    lo0, lo1, lo2, lo3 = _quarters(x_lo, NG)  # [NG, 16] each: x at columns 4i + m
    hi0, hi1, hi2, hi3 = _quarters(x_hi, NG)
    plain = tl.sum(x_lo, 1) + tl.sum(x_hi, 1)  # [NG] sum of x per block
    # bit 12 of the mantissa: x * 2^11; bit 16: x * 2^7 (see the table in the loop below)
    lo0, hi0, hi1, hi2 = lo0 * 2048.0, hi0 * 2048.0, hi1 * 2048.0, hi2 * 2048.0
    lo1, lo2, lo3, hi3 = lo1 * 128.0, lo2 * 128.0, lo3 * 128.0, hi3 * 128.0
    base = tl.sum(lo0 + hi0 + hi1 + hi2 + lo1 + lo2 + lo3 + hi3, 1)  # [NG] sum of x' per block
    # code at word bit s -> mantissa bit 12 or 16: s 0 (<< 12), 4 (<< 8), 8 (<< 8), 12, 16, 20 (>> 8), 24 (>> 8), 28 (>> 12)
    up8, down8 = words << 8, words >> 8
    acc = _code(words << 12, 0xF000, ASM) * lo0[None, :, :]
    acc = tl.fma(_code(up8, 0xF000, ASM), hi0[None, :, :], acc)
    acc = tl.fma(_code(up8, 0xF0000, ASM), lo1[None, :, :], acc)
    acc = tl.fma(_code(words, 0xF000, ASM), hi1[None, :, :], acc)
    acc = tl.fma(_code(words, 0xF0000, ASM), lo2[None, :, :], acc)
    acc = tl.fma(_code(down8, 0xF000, ASM), hi2[None, :, :], acc)
    acc = tl.fma(_code(down8, 0xF0000, ASM), lo3[None, :, :], acc)
    acc = tl.fma(_code(words >> 12, 0xF0000, ASM), hi3[None, :, :], acc)  # [BN, NG, 16]
    part = tl.sum(acc, 2) - (base + 8.0 * plain)[None, :]  # [BN, NG] sum of (c - 8) * x
    blk_ok = blk < tl.cdiv(k_in, 128)
    scale = tl.load(s_rows[:, None] + blk[None, :], mask=col_ok[:, None] & blk_ok[None, :], other=0.0)  # [BN, NG]
    return tl.sum(part * scale, 1)


@triton.jit
def _code(words, MASK: tl.constexpr, ASM: tl.constexpr):
    """1 + c * 2^(q - 23) as float32 for the nibble c at bits q .. q + 3 (MASK = 15 << q) of each word. ASM: one
    lop3 ((w & MASK) | 0x3F800000, lookup table 0xEA) where ptxas would emit an AND and an OR; the Triton
    interpreter cannot run inline assembly, so it takes the two-operation form."""
    if ASM:
        bits = tl.inline_asm_elementwise(f"lop3.b32 $0, $1, {MASK}, 1065353216, 0xEA;", "=r,r", [words],
                                         dtype=tl.int32, is_pure=True, pack=1)
    else:
        bits = (words & MASK) | 0x3F800000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _int4_gemv_half(codes, x, col0, s_rows, z_rows, col_ok, blk_ok, BLOCK_N: tl.constexpr, NG: tl.constexpr,
                    GROUP: tl.constexpr, ZP: tl.constexpr):
    """[BN] float32 of one half (64 columns from col0 [NG]) of each packing block: codes [BN, NG, 64], x [NG, 64]; the
    half's H = 64 / W pieces of W columns each get their own scale (and zero)."""
    W: tl.constexpr = 64 if GROUP > 64 else GROUP
    H: tl.constexpr = 64 // W
    values = codes.to(tl.float32) if ZP else codes.to(tl.float32) - 8.0
    part = tl.sum(tl.reshape(values * x[None, :, :], (BLOCK_N, NG, H, W)), 3)  # [BN, NG, H]
    g = ((col0[:, None] + tl.arange(0, H)[None, :] * W) // GROUP)[None, :, :]  # [1, NG, H] scale groups
    ok = col_ok[:, None, None] & blk_ok[None, :, None]
    if ZP:
        zero = tl.load(z_rows[:, None, None] + g, mask=ok, other=0.0)
        part = part - tl.sum(tl.reshape(x, (NG, H, W)), 2)[None, :, :] * zero
    scale = tl.load(s_rows[:, None, None] + g, mask=ok, other=0.0)  # [BN, NG, H]
    return tl.sum(tl.sum(part * scale, 2), 1)


@triton.jit
def _int4_words_step(acc, acc_up, a_row, w_rows, s_rows, col_ok, k0, k_in, stride_bn, up, up_rows,
                     GATED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ASM: tl.constexpr,
                     DP4A: tl.constexpr = 0):
    """One K step of the word-wise GEMV: gate (or only) and up words loaded first, then both dots (DP4A > 0: on
    integer dot products, int4_dp4a.py, DP4A its SUB: 1, one activation step per 128 columns; 2, per 32).
    (Measured on the H200, 2026-11-29: loading the activations' quarters strided instead of through shared memory,
    with gate and up rows stacked into one dot, was no faster: gate_up 11.5 vs 9.4 us, down 7.6 vs 7.2; removed.)"""
    words = _int4_words(w_rows, col_ok, k0, k_in, BLOCK_K)
    if GATED:
        words_up = _int4_words(w_rows + up_rows * stride_bn, col_ok, k0, k_in, BLOCK_K)
        acc_up += _words_dot(words_up, a_row, s_rows + up, col_ok, k0, k_in, BLOCK_N, BLOCK_K, ASM, DP4A)
    acc += _words_dot(words, a_row, s_rows, col_ok, k0, k_in, BLOCK_N, BLOCK_K, ASM, DP4A)
    return acc, acc_up


@triton.jit
def _words_dot(words, a_row, s_rows, col_ok, k0, k_in, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               ASM: tl.constexpr, DP4A: tl.constexpr):
    if DP4A > 0:
        return _int4_dp4a_dot(words, a_row, s_rows, col_ok, k0, k_in, BLOCK_N, BLOCK_K, ASM, DP4A)
    return _int4_words_dot(words, a_row, s_rows, col_ok, k0, k_in, BLOCK_N, BLOCK_K, ASM)


@triton.jit
def _int4_gemv_loop(acc, acc_up, a_row, w_rows, s_rows, z_rows, col_ok, k_in, stride_bn, stride_sn, up_rows,
                    GATED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
                    ZP: tl.constexpr, K_STATIC: tl.constexpr = 0, WORDS: tl.constexpr = 0):
    """(gate or only, up) [BN] float32 sums of the GEMV over all of K for int4 rows w_rows [BN]. K_STATIC = K > 0:
    the K loop unrolled at compile time, so the loads of every step can be issued before the first step's math."""
    up = up_rows * stride_sn
    # WORDS: unrolled only (as a dynamic loop, H200 at T=1: gate_up 12.0 vs 9.5 us with Triton's pipeliner, 10.8 vs
    # 9.4 with few registers and many programs per SM; down 8.1 vs 7.2). Measured on the H200 and dropped, 2026-11-29:
    # int4 GEMV on tensor cores: uint16 loads as the dot's A operand, x in one column of B; SASS 2.56 instructions per
    # weight unrolled, yet 23.2 vs 9.4 us gate_up, 11.9 vs 7.1 us down.
    if WORDS > 0 and GROUP == 128 and not ZP and K_STATIC > 0:
        for k0 in tl.static_range(0, K_STATIC, BLOCK_K):
            acc, acc_up = _int4_words_step(acc, acc_up, a_row, w_rows, s_rows, col_ok, k0, K_STATIC, stride_bn,
                                           up, up_rows, GATED, BLOCK_N, BLOCK_K, WORDS % 2 == 0,
                                           0 if WORDS < 3 else 1 if WORDS < 5 else 2)
    elif K_STATIC > 0:
        for k0 in tl.static_range(0, K_STATIC, BLOCK_K):
            acc += _int4_gemv_step(a_row, w_rows, s_rows, z_rows, col_ok, k0, K_STATIC, BLOCK_N, BLOCK_K, GROUP, ZP)
            if GATED:
                acc_up += _int4_gemv_step(a_row, w_rows + up_rows * stride_bn, s_rows + up, z_rows + up, col_ok, k0,
                                          K_STATIC, BLOCK_N, BLOCK_K, GROUP, ZP)
    else:
        for k0 in range(0, k_in, BLOCK_K):
            acc += _int4_gemv_step(a_row, w_rows, s_rows, z_rows, col_ok, k0, k_in, BLOCK_N, BLOCK_K, GROUP, ZP)
            if GATED:
                acc_up += _int4_gemv_step(a_row, w_rows + up_rows * stride_bn, s_rows + up, z_rows + up, col_ok, k0,
                                          k_in, BLOCK_N, BLOCK_K, GROUP, ZP)
    return acc, acc_up
