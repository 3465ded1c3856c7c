"""Large int4 steps (prefill) through the TMA + wgmma kernels, a chunk of experts at a time: symmetric int4 with
128-column groups as e4m3 codes (code - 8 is exact in e4m3) with their own group scales, through prefill_fp8's
block-scaled W8A8 kernels (from 1,024 tokens; H200, one Qwen3-30B-A3B layer at 1,024 / 2,048 / 4,096 tokens: 619 /
736 / 994 us against 925 / 1,018 / 1,251 for the bf16 route; benchmarks/results/int4-prefill-h200-fp8.md), else
the experts dequantized into a bf16 scratch, then prefill_moe per chunk.

    int4 w_gate_up, w_down [E, ...] --_dequant (chunk of C experts)--> bf16 scratch [C, 2I, H], [C, H, I]
    local_ids [T, K] --(ids in the chunk, else -1)--> prefill_moe(hidden, scratch, ...) --> += out [T, H] float32

Why: the int4 row-block GEMM (moe_kernels._moe_gemm) dequantizes every weight tile once per row block, in the
GEMM's inner loop. Measured on the H200 (benchmarks/h200/int4_prefill.py, one Qwen3-30B-A3B layer, us): 2,048
tokens 1,262 -> 1,016, 4,096 2,035 -> 1,236, 8,192 4,151 -> 1,712 (bf16 prefill_moe: 504, 724, 1,200); at 1,024 the
GEMM stays faster (830 vs 926; since on int8 tensor cores, I8, 781), hence MIN_TOKENS. The I8 GEMM's best tiles at
2,048 / 4,096 tokens took 1,187 / 1,986 us against this path's 1,006 / 1,230 (benchmarks/h200/int4_i8_sweep.py,
2026-11-30). Dequantizing a layer's 128 experts writes their bf16 bytes (~1.2
GB) in 503 us (3.0 TB/s). The scratch is one buffer per (shape, device), reused by every layer (1.2 GB for this
model, allocated at the first such step); SCRATCH_BYTES bounds it (more experts than fit: several chunks, each a
prefill_moe call over all tokens with the slots outside the chunk -1).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from moemesh.runtime.gpu import prefill_fp8, prefill_moe
from moemesh.runtime.quant import QuantTensor

MIN_TOKENS = int(os.environ.get("MOEMESH_INT4_PREFILL_MIN_TOKENS", "2048"))  # the bf16 route's threshold
FP8 = os.environ.get("MOEMESH_INT4_PREFILL_FP8", "1") == "1"  # symmetric int4 as e4m3 codes through prefill_fp8
SCRATCH_BYTES = int(os.environ.get("MOEMESH_INT4_PREFILL_SCRATCH_MB", "2048")) * 2**20
ROWS = 32  # rows of one program (each walking its rows' packing blocks): 16 packed bytes per thread and block


@triton.jit
def _dequant(q_ptr, s_ptr, z_ptr, out_ptr, rows, cols, stride_q, stride_s, GROUP: tl.constexpr, ZP: tl.constexpr,
             BLOCKS: tl.constexpr, BLOCK_R: tl.constexpr, CODES: tl.constexpr = False):
    """out[r, c] = (code(r, c) - zero) * scale for BLOCK_R rows: q [rows, BLOCKS * 64] packed (quant.py: byte j of
    block p = column 128p + j low nibble, 128p + 64 + j high), scale / zero [rows, G] per GROUP columns. CODES: the
    unscaled code - 8 (symmetric; exact in e4m3), the scales kept as they are."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = (r < rows)[:, None]
    r64 = r.to(tl.int64)[:, None]
    j = tl.arange(0, 64)[None, :]
    for p in range(BLOCKS):
        b = tl.load(q_ptr + r64 * stride_q + p * 64 + j, mask=r_ok, other=0)  # [R, 64] uint8
        for half in tl.static_range(2):  # low nibbles: columns 128p + j, high: 128p + 64 + j
            c = p * 128 + half * 64 + j  # [1, 64]
            code = ((b >> 4) if half == 1 else (b & 15)).to(tl.float32)
            ok = r_ok & (c < cols)
            # GROUP >= 64: one scale (and zero) per row for this half, else one per GROUP columns of it
            g = (p * 128 + half * 64) // GROUP if GROUP >= 64 else c // GROUP  # [1] or [1, 64]
            if CODES:
                tl.store(out_ptr + r64 * cols + c, (code - 8.0).to(out_ptr.dtype.element_ty), mask=ok)
            else:
                s = tl.load(s_ptr + r64 * stride_s + g, mask=r_ok, other=0.0)
                zero = tl.load(z_ptr + r64 * stride_s + g, mask=r_ok, other=0.0) if ZP else 8.0
                tl.store(out_ptr + r64 * cols + c, ((code - zero) * s).to(out_ptr.dtype.element_ty), mask=ok)


def as_fp8(w: QuantTensor, out: torch.Tensor) -> QuantTensor:
    """A symmetric int4 stack w [E', N, K] with 128-column groups as the same values in e4m3 (code - 8, exact) with
    w's own scales: a QuantTensor for prefill_fp8's block-scaled weights; out [E', N, K] float8_e4m3fn receives the
    codes (one launch)."""
    e, n, k = out.shape
    q, scale = w.q.reshape(e * n, -1), w.scale.reshape(e * n, -1)
    _dequant[(triton.cdiv(e * n, ROWS),)](q, scale, scale, out, e * n, k, q.stride(0), scale.stride(0),
                                          GROUP=w.block_k, ZP=False, BLOCKS=q.shape[1] // 64, BLOCK_R=ROWS,
                                          CODES=True)
    return QuantTensor(out, w.scale, w.block_k)


def dequantize_into(w: QuantTensor, out: torch.Tensor) -> torch.Tensor:
    """out [E', N, K] (contiguous, bf16/fp16) = w.dequantize(out.dtype) for an int4 stack w [E', N, K] (one launch;
    the same values as QuantTensor.dequantize: (code - zero) * scale in float32, one rounding)."""
    e, n, k = out.shape
    q, scale = w.q.reshape(e * n, -1), w.scale.reshape(e * n, -1)
    zero = w.zero.reshape(e * n, -1) if w.zero is not None else scale
    rows = e * n
    _dequant[(triton.cdiv(rows, ROWS),)](q, scale, zero, out, rows, k, q.stride(0), scale.stride(0),
                                         GROUP=w.block_k, ZP=w.zero is not None, BLOCKS=q.shape[1] // 64,
                                         BLOCK_R=ROWS)
    return out


def wanted(hidden: torch.Tensor, w_gate_up, w_down) -> bool:
    """Whether fused_moe should take this step here: int4 stacks of both, enough tokens, prefill_moe usable."""
    if not (isinstance(w_gate_up, QuantTensor) and isinstance(w_down, QuantTensor)):
        return False
    if w_gate_up.scheme != "int4" or w_down.scheme != "int4" or hidden.shape[0] < MIN_TOKENS:
        return False
    if not (prefill_moe.ENABLED and hidden.is_cuda and torch.cuda.get_device_capability(hidden.device)[0] >= 9):
        return False
    # what prefill_moe will be given (usable() reads dtype, contiguity and shape): meta tensors, no memory
    return prefill_moe.usable(hidden, torch.empty(1, *w_gate_up.shape[1:], dtype=hidden.dtype, device="meta"),
                              torch.empty(1, *w_down.shape[1:], dtype=hidden.dtype, device="meta")) == ""


def fp8_wanted(hidden: torch.Tensor, w_gate_up, w_down) -> bool:
    """Whether int4_prefill should go through e4m3 codes and prefill_fp8 (W8A8): symmetric int4 stacks of both
    with prefill_fp8's 128-column groups, from its token count on (H200, one Qwen3-30B-A3B layer:
    benchmarks/results/int4-prefill-h200-fp8.md)."""
    if not (isinstance(w_gate_up, QuantTensor) and isinstance(w_down, QuantTensor) and FP8 and prefill_fp8.ENABLED):
        return False
    if w_gate_up.scheme != "int4" or w_down.scheme != "int4" or w_gate_up.zero is not None or w_down.zero is not None:
        return False
    if hidden.shape[0] < prefill_fp8.PREFILL_MIN_TOKENS or not hidden.is_cuda:
        return False
    if torch.cuda.get_device_capability(hidden.device)[0] < 9:
        return False
    meta = [QuantTensor(torch.empty(1, *w.shape[1:], dtype=torch.float8_e4m3fn, device="meta"),
                        torch.empty(1, w.shape[1], w.shape[2] // 128, device="meta"), w.block_k)
            for w in (w_gate_up, w_down)]
    return all(w.block_k == 128 and w.shape[2] % 128 == 0 for w in (w_gate_up, w_down)) and \
        prefill_fp8.usable(hidden, *meta) == ""


def int4_prefill(hidden: torch.Tensor, w_gate_up: QuantTensor, w_down: QuantTensor, local_ids: torch.Tensor,
                 topk_weights: torch.Tensor, configs: tuple[dict, dict] | None = None,
                 fp8: bool | None = None) -> torch.Tensor:
    """fused_moe's contract for int4 experts: hidden [T, H], local_ids [T, K] (-1: not hosted), topk_weights
    [T, K] -> [T, H] float32, through chunks of experts made e4m3 codes for prefill_fp8 (fp8; None: fp8_wanted) or
    dequantized to bf16 for prefill_moe (configs: that kernel's block configs; tests)."""
    fp8 = fp8_wanted(hidden, w_gate_up, w_down) if fp8 is None else fp8
    e = w_gate_up.shape[0]
    gu_shape, dn_shape = tuple(w_gate_up.shape[1:]), tuple(w_down.shape[1:])
    dtype = torch.float8_e4m3fn if fp8 else hidden.dtype
    per_expert = (gu_shape[0] * gu_shape[1] + dn_shape[0] * dn_shape[1]) * dtype.itemsize
    chunk = max(1, min(e, SCRATCH_BYTES // per_expert))
    gu_buf, dn_buf = _scratch(chunk, gu_shape, dn_shape, dtype, hidden.device)
    out = None
    for e0 in range(0, e, chunk):
        c = min(chunk, e - e0)
        inside = (local_ids >= e0) & (local_ids < e0 + c)
        ids = torch.where(inside, local_ids - e0, torch.full_like(local_ids, -1))  # [T, K] chunk-local, else -1
        if fp8:
            gu, dn = as_fp8(w_gate_up[e0:e0 + c], gu_buf[:c]), as_fp8(w_down[e0:e0 + c], dn_buf[:c])
            part = prefill_fp8.prefill_fp8(hidden, gu, dn, ids, topk_weights, configs)
        else:
            gu, dn = dequantize_into(w_gate_up[e0:e0 + c], gu_buf[:c]), dequantize_into(w_down[e0:e0 + c],
                                                                                         dn_buf[:c])
            part = prefill_moe.prefill_moe(hidden, gu, dn, ids, topk_weights, configs)
        out = part if out is None else out.add_(part)
    return out


@functools.lru_cache(maxsize=4)
def _scratch(chunk: int, gu_shape: tuple, dn_shape: tuple, dtype: torch.dtype,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The dequantized experts' buffers, allocated once per shape and device (every layer reuses them)."""
    return (torch.empty(chunk, *gu_shape, dtype=dtype, device=device),
            torch.empty(chunk, *dn_shape, dtype=dtype, device=device))
