"""The few-token int4 GEMV on tensor cores (a candidate of benchmarks/h200/gemv_sweep.py, config key "TC"; off in
every shipped config until the H200 says otherwise).

    packed rows [BN] --uint16 loads [BN, 32] per 128-column block--> 4 code tiles (nibble q of each uint16) as
    OFFSET + code in the activations' dtype --tl.dot with x [32, 16] (x in column 0)--> [BN, 16] per block
    --minus (OFFSET + 8) * sum(x), times the block's scale--> column 0: [BN] float32

Why: the word-wise FMA GEMV (int4_kernels._int4_words_dot) runs 4.45 instructions per weight for gate_up and 7.7
for down on the H200 (ncu), against 2.5 for its decode (shift, lop3, FMA per code): the activations' layout change
and the reductions. Here the tensor cores do the multiply-add and the reuse of x across rows, and a code costs half
a shift and half a lop3 (two 16-bit lanes per register, inline PTX): sm_90 SASS (Triton 3.6), instructions per
weight, blocks unrolled (K_STATIC): gate_up 2.56 at BLOCK_N 64, down 2.55 at 128 (wgmma); as a loop 3.75 / 3.56;
at BLOCK_N 32 (mma.sync) the x side is not amortised (6.45). Not yet timed on the H200.

Layout (quant.py): uint16 m of a block holds bytes 2m and 2m + 1; nibble q (bits 4q) is column 2m + q // 2, plus 64
for odd q. Symmetric groups of 128 only (one scale per block); OFFSET + code is exact in bf16 (128) and fp16 (1024)
and the products of two 16-bit floats are exact in the float32 accumulator, as int4_kernels._magic.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _codes(u, SHIFT: tl.constexpr, DT: tl.constexpr, ASM: tl.constexpr):
    """u [BN, 32] uint16 -> [BN, 32] DT: OFFSET + the nibble at bits SHIFT .. SHIFT + 3 of each. ASM: one shift and
    one lop3 per two codes (the Triton interpreter cannot run inline PTX: plain ops)."""
    magic: tl.constexpr = 0x43004300 if DT == tl.bfloat16 else 0x64006400
    if ASM:
        v = tl.inline_asm_elementwise(
            f"{{ .reg .b32 t; shr.b32 t, $1, {SHIFT}; lop3.b32 $0, t, 983055, {magic}, 0xEA; }}",
            "=r,r", [u], dtype=tl.uint16, is_pure=True, pack=2)  # 983055 = 0x000F000F
    else:
        v = ((u >> SHIFT) & 15) | (magic & 0xFFFF)
    return v.to(DT, bitcast=True)


@triton.jit
def _block_dots(u, u_up, x_row, blk, k_in, GATED: tl.constexpr, BLOCK_N: tl.constexpr, DT: tl.constexpr,
                ASM: tl.constexpr):
    """([BN, 16] code tiles of u times x, the same for u_up (GATED), sum(x)) for block blk: each x tile built once
    for both."""
    m = tl.arange(0, 32)
    n16 = tl.arange(0, 16)
    part = tl.zeros((BLOCK_N, 16), dtype=tl.float32)
    part_up = tl.zeros((BLOCK_N, 16), dtype=tl.float32)
    xsum = 0.0
    for q in tl.static_range(4):
        col = blk * 128 + 2 * m + q // 2 + 64 * (q % 2)  # [32] columns of nibble q
        xv = tl.load(x_row + col, mask=col < k_in, other=0.0)
        xsum += tl.sum(xv.to(tl.float32), 0)
        xb = tl.where(n16[None, :] == 0, xv[:, None], 0.0).to(DT)  # [32, 16]: x in column 0
        part = tl.dot(_codes(u, 4 * q, DT, ASM), xb, part)
        if GATED:
            part_up = tl.dot(_codes(u_up, 4 * q, DT, ASM), xb, part_up)
    return part, part_up, xsum


@triton.jit
def _tc_block(tile, tile_up, gate, up, x_row, s_rows, col_ok, blk, k_in, stride_sn, up_rows, GATED: tl.constexpr,
              BLOCK_N: tl.constexpr, ASM: tl.constexpr):
    """tile (and tile_up) [BN, 16] += block blk's scaled partial products (gate / up: [BN, 32] uint16 pointers)."""
    DT: tl.constexpr = x_row.dtype.element_ty
    OFFSET: tl.constexpr = 128.0 if DT == tl.bfloat16 else 1024.0
    u = tl.load(gate + blk * 32, mask=col_ok[:, None], other=0)
    u_up = u
    if GATED:
        u_up = tl.load(up + blk * 32, mask=col_ok[:, None], other=0)
    part, part_up, xsum = _block_dots(u, u_up, x_row, blk, k_in, GATED, BLOCK_N, DT, ASM)
    off = (OFFSET + 8.0) * xsum
    tile += (part - off) * tl.load(s_rows + blk, mask=col_ok, other=0.0)[:, None]  # 0 past n_out
    if GATED:
        tile_up += (part_up - off) * tl.load(s_rows + up_rows * stride_sn + blk, mask=col_ok, other=0.0)[:, None]
    return tile, tile_up


@triton.jit
def _int4_tc_loop(acc, acc_up, x_row, w_rows, s_rows, col_ok, k_in, stride_bn, stride_sn, up_rows,
                  GATED: tl.constexpr, BLOCK_N: tl.constexpr, ASM: tl.constexpr, K_STATIC: tl.constexpr = 0):
    """(gate or only, up) [BN] float32 sums of the GEMV over all of K: w_rows [BN] packed row pointers (bytes), x_row
    the activation row, s_rows [BN] the rows' scales (one per 128 columns). K_STATIC = K > 0: blocks unrolled, the
    activations' bounds checks resolved at compile time."""
    m = tl.arange(0, 32)
    n16 = tl.arange(0, 16)
    gate = w_rows.to(tl.pointer_type(tl.uint16))[:, None] + m[None, :]  # [BN, 32]
    up = (w_rows + up_rows * stride_bn).to(tl.pointer_type(tl.uint16))[:, None] + m[None, :]
    tile = tl.zeros((BLOCK_N, 16), dtype=tl.float32)
    tile_up = tl.zeros((BLOCK_N, 16), dtype=tl.float32)
    if K_STATIC > 0:
        for blk in tl.static_range(0, (K_STATIC + 127) // 128):
            tile, tile_up = _tc_block(tile, tile_up, gate, up, x_row, s_rows, col_ok, blk, K_STATIC, stride_sn,
                                      up_rows, GATED, BLOCK_N, ASM)
    else:
        for blk in range(0, tl.cdiv(k_in, 128)):
            tile, tile_up = _tc_block(tile, tile_up, gate, up, x_row, s_rows, col_ok, blk, k_in, stride_sn, up_rows,
                                      GATED, BLOCK_N, ASM)
    acc += tl.sum(tl.where(n16[None, :] == 0, tile, 0.0), 1)  # column 0
    if GATED:
        acc_up += tl.sum(tl.where(n16[None, :] == 0, tile_up, 0.0), 1)
    return acc, acc_up
