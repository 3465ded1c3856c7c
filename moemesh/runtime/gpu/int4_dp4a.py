"""The few-token int4 GEMV on integer dot products (config key "DP4A"; symmetric groups of 128): the activations
rounded to int8 inside the kernel, one step per 128 columns (DP4A 128) or per 32 (DP4A 32, the H200 table's), four
codes times four activations per `dp4a`, as llama.cpp's mmvq kernels do with their q8_1 activations and ONNX
Runtime's MatMulNBits at accuracy_level 4 (the CPU backend's default here).

The word-wise float decode (int4_kernels._int4_words_dot) spends 4.45 instructions per weight at batch 1 on the H200
(ncu, 2026-11-29): the expert GEMVs ran at a third of HBM's rate, the SMs' issue slots full. Here a 32-bit word of 8
codes costs an AND, a shift-and-AND, two dp4a and an add (2.1-2.6 instructions per weight with the activations'
rounding, sm_90 SASS; H200 at one token: gate_up 9.4 -> 7.8 us, down 7.1 -> 5.8):

    x [NG, 128] (this K step's blocks) -> step s = absmax / 127 per piece, q = round(x / s) int8 # per program, step
      q packed 4 per int32 as the codes are: word i of a block = columns 4i..4i+3 (low nibbles), 64+4i.. (high)
    words [BN, NG, 16] -> dot = sum dp4a(w & 0x0F0F0F0F, q_lo) + dp4a((w >> 4) & 0x0F0F0F0F, q_hi)  # per piece
    sum_k (c_k - 8) * x_k * scale  ~=  sum over pieces (dot - 8 * sum(q)) * s, times scale[BN, NG]  # exact in int32

The only rounding added is x's to int8: on Qwen3-30B-A3B's expert shape (random weights, one token, both GEMVs)
the output is 1.2% (DP4A 32; 1.5% with DP4A 128) from the float decode, against 22% between int4 and bf16 weights.

_int4_mac_i8 is the same idea for the grouped GEMM (config key I8): int8 tensor cores on the codes unpacked four
per AND, 2.53 instructions per weight in its K loop against MAGIC's 4.45 (gate_up; down 3.99 against 5.14; sm_90
SASS). On the H200, one Qwen3-30B-A3B MoE layer (benchmarks/h200/int4_i8_sweep.py, us, table before -> I8): 32
tokens 223 -> 151, 64 235 -> 165, 128 241 -> 172, 256 353 -> 225, 1,024 804 -> 781; activations rounded per row
and 128 columns cost 1.6% of the output.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _quarters(x, NG: tl.constexpr):
    """x [NG, 64] -> the four [NG, 16] tensors x[:, 4i + m] for m = 0, 1, 2, 3."""
    even, odd = tl.split(tl.reshape(x, (NG, 16, 2, 2)))  # m = 2a + b: split takes b (the last axis) first
    x0, x2 = tl.split(even)
    x1, x3 = tl.split(odd)
    return x0, x1, x2, x3


@triton.jit
def _pack(q, NG: tl.constexpr):
    """q [NG, 64] int32 in [-127, 127] -> [NG, 16] int32 words holding bytes q[:, 4i + m] at bits 8m."""
    q0, q1, q2, q3 = _quarters(q, NG)
    return (q0 & 255) | ((q1 & 255) << 8) | ((q2 & 255) << 16) | (q3 << 24)


@triton.jit
def _round(v):
    """Round half away from zero to int32 (Triton's interpreter has no rint)."""
    return (v + tl.where(v >= 0, 0.5, -0.5)).to(tl.int32)


@triton.jit
def _dp4a(words, x, SHIFT: tl.constexpr, ASM: tl.constexpr):
    """Per word: dp4a of its four nibbles at bits SHIFT, SHIFT + 8, ... (codes, unsigned) with x's four signed bytes.
    Without ASM (the interpreter): the same sum byte by byte."""
    if ASM:
        return tl.inline_asm_elementwise(
            f"{{ .reg .b32 c; shr.u32 c, $1, {SHIFT}; and.b32 c, c, 0x0F0F0F0F; dp4a.u32.s32 $0, c, $2, 0; }}",
            "=r,r,r", [words, x], dtype=tl.int32, is_pure=True, pack=1)
    total = tl.zeros_like(words)
    for m in tl.static_range(4):
        total += ((words >> (8 * m + SHIFT)) & 15) * ((x << (24 - 8 * m)) >> 24)  # code * byte m sign-extended
    return total


@triton.jit
def _quantize(x, NG: tl.constexpr, SUB: tl.constexpr):
    """x [NG, 64] float32 -> (q [NG, 64] int32 in [-127, 127], step [NG, SUB], sum of q [NG, SUB]): one step
    (absmax / 127) per 64 / SUB columns."""
    xs = tl.reshape(x, (NG, SUB, 64 // SUB))
    amax = tl.max(tl.abs(xs), 2)  # [NG, SUB]
    step = tl.where(amax > 0, amax / 127.0, 1.0)  # an all-zero piece: q = 0 whatever the step
    v = xs / step[:, :, None]
    q = _round(v)
    return tl.reshape(q, (NG, 64)), step, tl.sum(q, 2)


@triton.jit
def _int4_dp4a_dot(words, x_row, s_rows, col_ok, k0, k_in, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   ASM: tl.constexpr, SUB: tl.constexpr = 1):
    """_int4_words_dot's contract on integer dot products: [BN] float32 sums over columns k0 .. k0 + BLOCK_K of
    W[n, k] * x[k] (x rounded to int8 with one step per 64 / SUB columns: SUB 1, a step per 128-column block, or 2
    per 32 columns) from words [BN, BLOCK_K / 128, 16] (_int4_words)."""
    NG: tl.constexpr = BLOCK_K // 128
    blk = k0 // 128 + tl.arange(0, NG)  # [NG] packing blocks of this step
    col = (blk * 128)[:, None] + tl.arange(0, 64)[None, :]  # [NG, 64] columns of the low nibbles
    x_lo = tl.load(x_row + col, mask=col < k_in, other=0.0).to(tl.float32)
    x_hi = tl.load(x_row + col + 64, mask=col + 64 < k_in, other=0.0).to(tl.float32)
    if SUB == 1:  # one step for the whole block: both halves share it, one dp4a chain per word
        amax = tl.maximum(tl.max(tl.abs(x_lo), 1), tl.max(tl.abs(x_hi), 1))  # [NG]
        sx = tl.where(amax > 0, amax / 127.0, 1.0)  # [NG]
        q_lo, q_hi = _round(x_lo / sx[:, None]), _round(x_hi / sx[:, None])  # [NG, 64] in [-127, 127]
        q_sum = tl.sum(q_lo, 1) + tl.sum(q_hi, 1)  # [NG]
        dot = tl.sum(_dp4a_pair(words, _pack(q_lo, NG)[None, :, :], _pack(q_hi, NG)[None, :, :], ASM), 2)
        part = (dot - 8 * q_sum[None, :]).to(tl.float32) * sx[None, :]  # [BN, NG]
    else:  # word i of a half covers its columns 4i..4i+3: words 0-7 the first 32, 8-15 the next
        q_lo, s_lo, n_lo = _quantize(x_lo, NG, SUB)
        q_hi, s_hi, n_hi = _quantize(x_hi, NG, SUB)
        d_lo = tl.sum(tl.reshape(_dp4a(words, _pack(q_lo, NG)[None, :, :], 0, ASM), (BLOCK_N, NG, SUB, 16 // SUB)), 3)
        d_hi = tl.sum(tl.reshape(_dp4a(words, _pack(q_hi, NG)[None, :, :], 4, ASM), (BLOCK_N, NG, SUB, 16 // SUB)), 3)
        part = tl.sum((d_lo - 8 * n_lo[None, :, :]).to(tl.float32) * s_lo[None, :, :]
                      + (d_hi - 8 * n_hi[None, :, :]).to(tl.float32) * s_hi[None, :, :], 2)  # [BN, NG]
    blk_ok = blk < tl.cdiv(k_in, 128)
    scale = tl.load(s_rows[:, None] + blk[None, :], mask=col_ok[:, None] & blk_ok[None, :], other=0.0)  # [BN, NG]
    return tl.sum(part * scale, 1)


@triton.jit
def _dp4a_pair(words, x_lo, x_hi, ASM: tl.constexpr):
    """dp4a(low nibbles, x_lo) + dp4a(high nibbles, x_hi) per word: codes as unsigned bytes, x signed. Without ASM
    (the interpreter): the same sum byte by byte."""
    if ASM:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 l, h; and.b32 l, $1, 0x0F0F0F0F; shr.u32 h, $1, 4; and.b32 h, h, 0x0F0F0F0F; "
            "dp4a.u32.s32 $0, l, $2, 0; dp4a.u32.s32 $0, h, $3, $0; }",
            "=r,r,r,r", [words, x_lo, x_hi], dtype=tl.int32, is_pure=True, pack=1)
    total = tl.zeros_like(words)
    for m in tl.static_range(4):
        lo = (words >> (8 * m)) & 15
        hi = (words >> (8 * m + 4)) & 15
        xl = ((x_lo << (24 - 8 * m)) >> 24)  # byte m, sign-extended
        xh = ((x_hi << (24 - 8 * m)) >> 24)
        total += lo * xl + hi * xh
    return total




@triton.jit
def _int4_mac_i8(acc, a_rows, b_cols, s_ptrs, row_ok, col_ok, k0, k_in, ASM: tl.constexpr):
    """The grouped GEMM's K step (moe_kernels._moe_gemm, config key I8; symmetric groups of 128) on int8 tensor
    cores: acc [BM, BN] += A[:, k0:k0+128] @ W[k0:k0+128, :] for one packing block, the activations rounded to int8
    with one step per row and block (as the dp4a GEMV's DP4A 128), the codes unpacked to int8 four per AND, the four
    32-column dots summed in int32 and converted once. a_rows [BM] activation row pointers, b_cols [BN] packed rows,
    s_ptrs [BN] their scales. A sweep candidate, off in every table (prepared 2026-11-29 against the MAGIC GEMM's
    230 us per layer at 48-128 tokens on the H200; not yet timed)."""
    j = tl.arange(0, 32)
    # columns of the four 32-column pieces: bytes 32h + j hold 32h + j (low nibbles) and 64 + 32h + j (high)
    x0, x1 = _piece(a_rows, row_ok, k0, k_in), _piece(a_rows, row_ok, k0 + 32, k_in)  # [BM, 32] each
    x2, x3 = _piece(a_rows, row_ok, k0 + 64, k_in), _piece(a_rows, row_ok, k0 + 96, k_in)
    amax = tl.maximum(tl.maximum(tl.max(tl.abs(x0), 1), tl.max(tl.abs(x1), 1)),
                      tl.maximum(tl.max(tl.abs(x2), 1), tl.max(tl.abs(x3), 1)))  # [BM]
    step = tl.where(amax > 0, amax / 127.0, 1.0)[:, None]  # [BM, 1]
    q0, q1 = _round(x0 / step).to(tl.int8), _round(x1 / step).to(tl.int8)  # [BM, 32], |q| <= 127
    q2, q3 = _round(x2 / step).to(tl.int8), _round(x3 / step).to(tl.int8)
    b0 = tl.load(b_cols[None, :] + k0 // 2 + j[:, None], mask=col_ok[None, :], other=0)  # [32, BN] uint8
    b1 = tl.load(b_cols[None, :] + k0 // 2 + 32 + j[:, None], mask=col_ok[None, :], other=0)
    d = tl.dot(q0, _nibbles(b0, 0, ASM), out_dtype=tl.int32)  # [BM, BN] int32
    d = tl.dot(q1, _nibbles(b1, 0, ASM), d, out_dtype=tl.int32)
    d = tl.dot(q2, _nibbles(b0, 4, ASM), d, out_dtype=tl.int32)
    d = tl.dot(q3, _nibbles(b1, 4, ASM), d, out_dtype=tl.int32)
    q_sum = tl.sum(q0.to(tl.int32), 1) + tl.sum(q1.to(tl.int32), 1) + tl.sum(q2.to(tl.int32), 1) + tl.sum(
        q3.to(tl.int32), 1)  # [BM]
    part = (d - 8 * q_sum[:, None]).to(tl.float32) * step
    return acc + part * tl.load(s_ptrs + k0 // 128, mask=col_ok, other=0.0)[None, :]


@triton.jit
def _piece(a_rows, row_ok, col0, k_in):
    """[BM, 32] float32 activations of columns col0 .. col0 + 31 (0 past k_in)."""
    j = tl.arange(0, 32)
    return tl.load(a_rows[:, None] + col0 + j[None, :], mask=row_ok[:, None] & (j < k_in - col0)[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def _nibbles(b, SHIFT: tl.constexpr, ASM: tl.constexpr):
    """b uint8 -> its nibbles at bit SHIFT as int8 codes in [0, 16). ASM: four bytes per 32-bit AND (pack=4)."""
    if ASM:
        if SHIFT == 0:
            return tl.inline_asm_elementwise("and.b32 $0, $1, 0x0F0F0F0F;", "=r,r", [b], dtype=tl.int8,
                                             is_pure=True, pack=4)
        return tl.inline_asm_elementwise("{ shr.b32 $0, $1, 4; and.b32 $0, $0, 0x0F0F0F0F; }", "=r,r", [b],
                                         dtype=tl.int8, is_pure=True, pack=4)
    return ((b >> SHIFT) & 15).to(tl.int8)
