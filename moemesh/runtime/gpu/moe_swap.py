"""Quantized experts (fp8 e4m3, int8, int4) at decode sizes: fused_moe's grouped GEMM with its operands swapped.

_moe_gemm (moe_kernels.py) multiplies the tokens A [BM, BK] by the expert's weights B [BK, BN]. With 8-bit weights,
B is converted in registers (fp8 -> f16 -> bf16, three conversions per two weights) and must then go back through
shared memory, where the tensor cores read their right operand. Here the weights are the left operand, which
mma / wgmma read straight from registers, and the few tokens of an expert are the right one (vLLM's and
TensorRT-LLM's "swap AB" for small M):

    hidden / act rows, sorted pairs (moe_align: BLOCK_M rows per expert block, P marks padding)
      -> acc^T [BN, BM] = W_e [BN, K] @ X [BM, K]^T, in fp16:                               # float32 accumulators
           W: one cvt.rn.f16x2.e4m3x2 per two fp8 weights (int8: I8_F16, int4: I4_F16; exact)
           X: bf16 -> fp16 as is; a tile that comes out non-finite runs again with rows scaled (_row_scale)
      -> scales (per channel on acc's rows after the K loop, or per GROUP_K block on each partial product)
      -> GATED: silu(gate) * up; WEIGHTED: x routing weight[pair]
      -> C[pair, cols] = acc^T's columns                                                    # [P, n_out]

Measured on the H200 (2026-11-30, moe-swap-h200.json): one MoE layer of the Qwen3-30B-A3B shape (E 128, top-8,
H 2048, I 768), 12 layers of distinct weights in one CUDA graph, us per layer, what fused_moe runs without the swap ->
this (benchmarks/h200/swap_sweep.py --schemes fp8,int8,int4 --write):
- fp8 per channel: 8 tokens 97.5 -> 73.9, 16: 158.8 -> 119.7, 32: 192.2 -> 147.2, 64: 209.8 -> 160.4 (87% of the
  HBM limit), 128: 209.0 -> 176.5, 256: 297.6 -> 245.4; 512: 345.6 against 343.5 (under 3%, not taken).
  Each GEMM's own tile (swap_sweep.py --per-kind, moe-swap-fp8-per-kind-h200.json) changed only 256 tokens: 242.3 ->
  235.5 (16-row blocks, down on 128 columns); 8 / 16 / 32 / 64 tokens 73.6 / 118.5 / 145.9 / 159.7 (76-88%).
- int8 (I8_F16): 8 tokens 86.5 -> 76.1, 16: 127.2 -> 120.9, 64: 168.5 -> 161.8 (taken to 64); 0.81-1.02x from 128.
  Per GEMM (moe-swap-int8-per-kind-h200.json): 8 / 16 / 32 / 64 tokens 74.3 / 119.7 / 147.0 / 160.7, no gain.
- int4 (symmetric, groups of 128; I4_F16): 24 tokens 137.2 -> 118.2, 64: 155.5 -> 141.0; the dp4a GEMV stays faster
  to 16 tokens, the int8-tensor-core GEMM from 128. With a tile per GEMM (swap_sweep.py --per-kind; down on 128
  columns, gate_up too at 64 tokens on 8 warps): 24 / 32 / 64 tokens 110.1 / 117.1 / 132.4. With I4_F16's ten
  instructions per four bytes and two packing blocks per K step (BLOCK_K 256; moe-swap-int4-bk256-h200.json): 24 / 32
  / 64 / 128 tokens 103.2 / 109.5 / 119.8 / 148.5 (57-58% of the HBM limit to 64 tokens; the GEMM 136.0 / 142.9 /
  152.4 / 157.0, so 128 tokens now takes the swap too); 16 tokens stays on the q8 GEMV (93.5 against 88.1).
  Why int4 stays near 55% of its limit: widen_ptx.py (Nsight Compute: issue and latency, not bandwidth). Capping
  registers for more programs per SM (a config's "maxnreg"; swap_sweep.py --maxnreg 96,80) gained nothing: 24 / 32
  / 64 / 128 tokens 104.3 / 112.1 / 121.2 / 150.3, the caps chosen only at 24 (moe-swap-int4-maxnreg-h200.json).
Rows are never clamped (a SwiGLU output past 65504 is plain for Qwen-family outlier tokens). The K loop takes the
activations as they are (a bf16 value is exact in fp16, or infinite past 65504; per-channel scales let the dot
accumulate in place); only a tile whose accumulators come out non-finite runs again with rows scaled (_tile's SCALE,
not pipelined). Main loop sm_90 SASS: fp8 425, int8 612, int4 654 instructions; registers 168 / 168 / 128. Scaling
rows in every K step instead (fp8 553, int8 756, int4 759) was 7-25% slower: fp8 64 tokens 171.6, 256: 305.9.
Measured and not taken: exact bf16 products for fp8 (a prmt/lop3 bit move and a bf16x2 multiply by 2^120 per two
weights) were 4-12% slower than fp16, Triton's own fp8 -> bf16 conversion 15-40% slower. int4 on int8 tensor cores
(branch int4-swap-i8, 2026-11-30: codes unpacked four per AND into s8 wgmma operands, rows rounded to int8 once per
128 columns by int4_q8.quantize_rows before each GEMM): 32 / 64 / 128 / 256 tokens 140.3 / 159.8 / 182.9 / 275.1 us
per layer against this kernel's 122.6 / 141.8 / 157.9 / 241.4 (benchmarks/results/moe-swap-i8-h200.json). int4
codes as bf16 beside bf16 activations (branch int4-swap-bf16: no x conversion, 634 instructions): 0.91-0.94x at 16-64
tokens, 1.02x at 128 (benchmarks/h200/swap_ab.py, 2026-11-30). EVEN_K (whole K steps without masks): 1.04-1.06x at
24-64 tokens, 1.01x at 128, the same bits (moe-swap-ab-int4-evenk-h200.json).

fused_moe hands a step to moe_gemm_swap when `config` finds an entry (configs/*.json kinds "swap_gate_up" and
"swap_down", written by swap_sweep.py --write; SWAP_DEFAULT where the GPU has no table, up to SWAP_MAX_TOKENS).
MOEMESH_MOE_SWAP=0 turns it off.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from moemesh.runtime.gpu import pdl
from moemesh.runtime.gpu.moe_align import Alignment
from moemesh.runtime.gpu.pdl import enter
from moemesh.runtime.gpu.widen_ptx import I4_F16, I8_F16
from moemesh.runtime.quant import QuantTensor

ENABLED = os.environ.get("MOEMESH_MOE_SWAP", "1") != "0"
# Without a tuned table: the largest step to take the swap, by scheme (int8 and int4: only where a table says so).
SWAP_MAX_TOKENS = {"fp8": 256, "int8": 0, "int4": 0}
# Without a tuned table: the H200's winners (its own table, from swap_sweep.py, reaches 512 tokens). An entry at m
# tokens serves the steps above the previous entry up to m.
SWAP_DEFAULT = {64: {"BLOCK_M": 8, "BLOCK_N": 64, "BLOCK_K": 256, "num_warps": 4, "num_stages": 3},
                128: {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3},
                256: {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3}}
@triton.jit
def _moe_gemm_swap(x_ptr, w_ptr, c_ptr, weight_ptr, sorted_ptr, expert_ptr, rows_used_ptr, scale_ptr,
                   num_pairs, n_out, k_in, stride_xm, stride_we, stride_wn, stride_cm, stride_se, stride_sn,
                   up_rows, X_DIV: tl.constexpr, GATED: tl.constexpr, WEIGHTED: tl.constexpr,
                   GROUP_K: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, FP8: tl.constexpr = True, ASM: tl.constexpr = False,
                   INT4: tl.constexpr = False, PDL: tl.constexpr = False):
    """C[pair] = X[pair // X_DIV] @ W_e^T for one [BM rows of one expert, BN output channels] tile, computed as
    its transpose. W [E, n_out (+ up_rows), k_in] int8, or FP8: e4m3 bits as uint8 (masked loads fill zeros, which
    Triton's interpreter cannot cast to fp8), or INT4: [E, N, k_in / 2] packed codes; scales [E, N, G].
    ASM: int8 / int4 converted by inline PTX (I8_F16, I4_F16), else in plain Triton (the interpreter).
    Grid: (n_out / BN, EM / BM)."""
    enter(PDL)  # PDL: launch the next kernel early, wait for the last (pdl.py)
    pid_m = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(rows_used_ptr):
        return  # past the padded rows in use this step (the grid is sized for the worst case)
    pair = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # [BM] int64; num_pairs marks padding
    row_ok = pair < num_pairs
    expert = tl.load(expert_ptr + pid_m)
    cols = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # [BN]
    col_ok = cols < n_out
    s_ptrs = scale_ptr + expert * stride_se + cols * stride_sn  # [BN]
    x_rows = x_ptr + (pair // X_DIV) * stride_xm  # [BM]
    w_rows = w_ptr + expert * stride_we + cols * stride_wn  # [BN]
    # Activations as they are first (a bf16 value is exact in fp16 or, past 65504, infinite); only a tile whose
    # accumulators come out non-finite (an outlier row, or a NaN from upstream) runs again with its rows scaled.
    acc, acc_up = _tile(x_rows, w_rows, s_ptrs, row_ok, col_ok, k_in, stride_wn, stride_sn, up_rows, GATED, GROUP_K,
                        EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K, FP8, ASM, INT4, False)
    if tl.sum(tl.where(acc - acc == 0, 0, 1)) + tl.sum(tl.where(acc_up - acc_up == 0, 0, 1)) > 0:
        acc, acc_up = _tile(x_rows, w_rows, s_ptrs, row_ok, col_ok, k_in, stride_wn, stride_sn, up_rows, GATED,
                            GROUP_K, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K, FP8, ASM, INT4, True)
    if GROUP_K == 0:  # per-channel scales: once, on the float32 accumulators' rows (int4: GROUP_K 128)
        acc = acc * tl.load(s_ptrs, mask=col_ok, other=0.0)[:, None]
        if GATED:
            acc_up = acc_up * tl.load(s_ptrs + up_rows * stride_sn, mask=col_ok, other=0.0)[:, None]
    if GATED:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up  # silu(gate) * up in float32, one rounding
    if WEIGHTED:
        acc = acc * tl.load(weight_ptr + pair, mask=row_ok, other=0.0)[None, :]
    c_ptrs = c_ptr + pair[None, :] * stride_cm + cols[:, None]  # [BN, BM]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=col_ok[:, None] & row_ok[None, :])


@triton.jit
def _tile(x_rows, w_rows, s_ptrs, row_ok, col_ok, k_in, stride_wn, stride_sn, up_rows, GATED: tl.constexpr,
          GROUP_K: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
          BLOCK_K: tl.constexpr, FP8: tl.constexpr, ASM: tl.constexpr, INT4: tl.constexpr, SCALE: tl.constexpr):
    """(acc, acc_up) [BN, BM] float32 of the tile over all of K. SCALE: rows scaled per K step (_row_scale)."""
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # [BN, BM]: C's tile transposed
    acc_up = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    if INT4:
        return _int4_loop(acc, acc_up, x_rows, w_rows, s_ptrs, row_ok, col_ok, k_in, stride_wn, stride_sn, up_rows,
                          GATED, EVEN_K, BLOCK_K, ASM, SCALE)
    return _byte_loop(acc, acc_up, x_rows, w_rows, s_ptrs, row_ok, col_ok, k_in, stride_wn, stride_sn, up_rows,
                      GATED, GROUP_K, EVEN_K, BLOCK_K, FP8, ASM, SCALE)


@triton.jit
def _byte_loop(acc, acc_up, x_rows, w_rows, s_ptrs, row_ok, col_ok, k_in, stride_wn, stride_sn, up_rows,
               GATED: tl.constexpr, GROUP_K: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr,
               FP8: tl.constexpr, ASM: tl.constexpr, SCALE: tl.constexpr):
    """The K loop for fp8 / int8 weights: BLOCK_K columns per step."""
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_rows[:, None] + ks[None, :]  # [BM, BK]
    w_ptrs = w_rows[:, None] + ks[None, :]  # [BN, BK]
    for k0 in tl.range(0, k_in, BLOCK_K, num_stages=1 if SCALE else None):  # the rare path: not pipelined
        if EVEN_K:
            x_ok, w_ok = row_ok[:, None], col_ok[:, None]
        else:
            k_ok = ks < k_in - k0  # [BK]
            x_ok, w_ok = row_ok[:, None] & k_ok[None, :], col_ok[:, None] & k_ok[None, :]
        xf = tl.load(x_ptrs, mask=x_ok, other=0.0).to(tl.float32)  # [BM, BK]
        rs = _row_scale(tl.max(tl.abs(xf), 1), SCALE)  # [BM]
        x = _fp16(xf, rs, SCALE)  # [BK, BM]
        acc = _mac(acc, tl.load(w_ptrs, mask=w_ok, other=0), x, rs, s_ptrs, k0, GROUP_K, FP8, ASM, SCALE)
        if GATED:
            acc_up = _mac(acc_up, tl.load(w_ptrs + up_rows * stride_wn, mask=w_ok, other=0), x, rs,
                          s_ptrs + up_rows * stride_sn, k0, GROUP_K, FP8, ASM, SCALE)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    return acc, acc_up


@triton.jit
def _int4_loop(acc, acc_up, x_rows, w_rows, s_ptrs, row_ok, col_ok, k_in, stride_wn, stride_sn, up_rows,
               GATED: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr, ASM: tl.constexpr,
               SCALE: tl.constexpr):
    """The K loop for symmetric int4 in groups of 128 (quant.py's packing: byte j of a row's block p holds column
    128p + j in its low nibble and 128p + 64 + j in its high one): BLOCK_K / 128 blocks per step (unrolled), per
    block two fp16 dots and the group's scale on the partial. x_rows [BM] activation row pointers, w_rows [BN]
    packed weight rows. EVEN_K: whole steps, no K masks (Triton 3.6 sm_90 SASS of the K loop at BN 64, BK 256: 699
    -> 652 instructions); else a block past k_in (a ragged last step) is masked whole."""
    j = tl.arange(0, 64)
    for k0 in tl.range(0, k_in, BLOCK_K, num_stages=1 if SCALE else None):  # the rare path: not pipelined
        for blk in tl.static_range(BLOCK_K // 128):
            kb = k0 + blk * 128
            if EVEN_K:
                x_ok_lo, x_ok_hi, w_ok = row_ok[:, None], row_ok[:, None], col_ok
            else:
                x_ok_lo = row_ok[:, None] & (j < k_in - kb)[None, :]
                x_ok_hi = row_ok[:, None] & (j < k_in - kb - 64)[None, :]
                w_ok = tl.where(kb < k_in, col_ok, False)  # [BN]
            x_lo = tl.load(x_rows[:, None] + kb + j[None, :], mask=x_ok_lo, other=0.0).to(tl.float32)
            x_hi = tl.load(x_rows[:, None] + kb + 64 + j[None, :], mask=x_ok_hi, other=0.0).to(tl.float32)
            rs = _row_scale(tl.maximum(tl.max(tl.abs(x_lo), 1), tl.max(tl.abs(x_hi), 1)), SCALE)  # [BM] per block
            x_lo, x_hi = _fp16(x_lo, rs, SCALE), _fp16(x_hi, rs, SCALE)  # [64, BM] each
            b = tl.load(w_rows[:, None] + kb // 2 + j[None, :], mask=w_ok[:, None], other=0)  # [BN, 64] uint8
            acc = _int4_part(acc, b, x_lo, x_hi, rs, s_ptrs + kb // 128, w_ok, ASM, SCALE)
            if GATED:
                b = tl.load(w_rows[:, None] + up_rows * stride_wn + kb // 2 + j[None, :], mask=w_ok[:, None],
                            other=0)
                acc_up = _int4_part(acc_up, b, x_lo, x_hi, rs, s_ptrs + up_rows * stride_sn + kb // 128, w_ok,
                                    ASM, SCALE)
    return acc, acc_up


@triton.jit
def _row_scale(big, SCALE: tl.constexpr):
    """big [BM] the rows' largest magnitudes in a tile -> rs [BM]: a power of two, 1 unless a row passes 2^15, so that
    fp16 (11 significant bits, bf16 has 8, but a range to 65504 only) holds x / rs for any bf16 activation, a SwiGLU
    output of an outlier token included. Below 2^-14 of rs fp16 keeps fewer bits (subnormals). Without SCALE: unused."""
    if SCALE:
        return tl.where(big > 32768.0, tl.exp2(tl.ceil(tl.log2(big)) - 15.0), 1.0)  # big / rs <= 2^15
    return big


@triton.jit
def _fp16(x, rs, SCALE: tl.constexpr):
    """x [BM, K'] float32 -> x / rs [BM] (SCALE) in fp16, transposed [K', BM] (the dot's right operand); times 1 / rs,
    exact for a power of two, where a division per element cost a MUFU.RCP and more."""
    if SCALE:
        return (x * (1.0 / rs)[:, None]).to(tl.float16).T
    return x.to(tl.float16).T


@triton.jit
def _int4_part(acc, b, x_lo, x_hi, rs, s_ptrs, col_ok, ASM: tl.constexpr, SCALE: tl.constexpr):
    """acc [BN, BM] += (codes [BN, 64 + 64] - 8) @ [x_lo; x_hi] (rows divided by rs [BM]) times the group scales
    [BN] and rs."""
    if ASM:
        lo, hi = tl.inline_asm_elementwise(I4_F16, "=r,=r,=r,=r,r", [b], dtype=(tl.float16, tl.float16),
                                           is_pure=True, pack=4)
    else:
        lo = ((b & 15).to(tl.int8) - 8).to(tl.float16)
        hi = ((b >> 4).to(tl.int8) - 8).to(tl.float16)
    part = tl.dot(hi, x_hi, tl.dot(lo, x_lo)) * tl.load(s_ptrs, mask=col_ok, other=0.0)[:, None]
    if SCALE:
        part = part * rs[None, :]
    return acc + part


@triton.jit
def _mac(acc, w, x, rs, s_ptrs, k0, GROUP_K: tl.constexpr, FP8: tl.constexpr, ASM: tl.constexpr,
         SCALE: tl.constexpr):
    """acc [BN, BM] += w [BN, BK] (8-bit, to fp16 in registers) @ x [BK, BM] (fp16; SCALE: rows divided by rs [BM],
    the partial times rs); block scales on the partial. Per-channel without SCALE: the dot accumulates in place."""
    if FP8:
        w16 = w.to(tl.float8e4nv, bitcast=True).to(tl.float16)  # cvt.rn.f16x2.e4m3x2: two weights per instruction
    elif ASM:
        w16 = tl.inline_asm_elementwise(I8_F16, "=r,=r,r", [w], dtype=tl.float16, is_pure=True, pack=4)
    else:
        w16 = w.to(tl.float16)
    if GROUP_K == 0 and not SCALE:
        return tl.dot(w16, x, acc)
    part = tl.dot(w16, x)
    if SCALE:
        part = part * rs[None, :]
    if GROUP_K > 0:
        part = part * tl.load(s_ptrs + k0 // GROUP_K)[:, None]
    return acc + part


def config(tokens: int, tuned: dict[int, dict] | None, kind: str, scheme: str = "fp8") -> dict | None:
    """The swap config for a step of `tokens` tokens, or None for fused_moe's GEMM. tuned: {tokens: entry} of the
    weights' table (entries with `kind` = "swap_gate_up" / "swap_down" are the token counts where the swap won,
    entries with "swap": false those where it lost; a step takes the nearest such count at or above it; a table
    without either was swept and the swap lost everywhere: None)."""
    if not ENABLED:
        return None
    table = {m: e.get(kind) for m, e in tuned.items() if kind in e or e.get("swap") is False} if tuned else {
        m: c for m, c in SWAP_DEFAULT.items() if m <= SWAP_MAX_TOKENS[scheme]}
    fits = [m for m in table if m >= tokens]
    return table[min(fits)] if fits else None


def usable(w) -> bool:
    """fp8 / int8 weight-only QuantTensors, or symmetric int4 in groups of 128, on a GPU."""
    if not isinstance(w, QuantTensor) or not w.q.is_cuda:
        return False
    return w.scheme in ("fp8", "int8") or (w.scheme == "int4" and w.zero is None and w.block_k == 128)


def moe_gemm_swap(x: torch.Tensor, w: QuantTensor, out: torch.Tensor, al: Alignment, x_div: int, cfg: dict,
                  weights: torch.Tensor | None = None, up_rows: int = 0) -> torch.Tensor:
    """fused_moe.moe_gemm's contract with the swapped kernel: out [P, n_out] = (GATED: SwiGLU of) x[pair // x_div] @
    W_e^T (x WEIGHTED weights[pair]) for the pairs al sorted; rows of pairs not computed are left as they were."""
    n_out, k_in = out.shape[1], x.shape[1]
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    int4 = w.scheme == "int4"
    if int4 and (w.zero is not None or w.block_k != 128):
        raise ValueError("int4 through the swapped GEMM needs symmetric codes in groups of 128")
    if al.block_m != bm:
        raise ValueError(f"alignment of {al.block_m}-row blocks for a BLOCK_M {bm} config")
    group = 0 if w.per_channel else w.block_k
    if int4:  # one or two 128-column packing blocks per K step
        block_k = 256 if cfg["BLOCK_K"] >= 256 else 128
    else:
        block_k = min(cfg["BLOCK_K"], group) if group else cfg["BLOCK_K"]
        if group % block_k:
            raise ValueError(f"scale block of {group} columns is not a multiple of BLOCK_K {block_k}")
    em = al.sorted_ids.numel()
    grid = (triton.cdiv(n_out, bn), triton.cdiv(em, bm))
    fp8 = w.scheme == "fp8"
    _moe_gemm_swap[grid](
        x, w.q.view(torch.uint8) if fp8 else w.q, out, weights if weights is not None else out, al.sorted_ids,
        al.block_expert, al.rows_used, w.scale,
        al.num_pairs, n_out, k_in, x.stride(0), w.q.stride(0), w.q.stride(1), out.stride(0), w.scale.stride(0),
        w.scale.stride(1), up_rows, X_DIV=x_div, GATED=up_rows > 0, WEIGHTED=weights is not None, GROUP_K=group,
        EVEN_K=k_in % block_k == 0, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=block_k, FP8=fp8,
        ASM=not fp8 and os.environ.get("TRITON_INTERPRET") != "1", INT4=int4, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"], **({"maxnreg": cfg["maxnreg"]} if cfg.get("maxnreg") else {}), **pdl.launch())
    return out
