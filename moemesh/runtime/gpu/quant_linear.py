"""Dense projections with weight-only quantized weights on CUDA (quant.QuantLinear: a dense model's FFN, and the
attention projections under Engine.load(quantize_attention=True)): y [T, N] = x [T, K] @ W^T (+ bias).

    T <= GEMV_MAX_ROWS: fused_moe.moe_gemv over a one-"expert" stack W [1, N, K], every row on expert 0
                        (one launch; int4 codes decoded in registers, on dp4a with x rounded per 32 columns)
    larger T:           int4: W dequantized into a scratch in one launch (int4_prefill.dequantize_into), then cuBLAS
                        fp8 / int8: QuantTensor.dequantize, then cuBLAS

Why a GEMV only up to 2 rows: moe_gemv runs one program per (row, column block), so W is read once per row (from L2
after the first). Measured on the H200 (benchmarks/h200/dense_int4.py, Qwen3-30B-A3B's q/k/v [5120, 2048] and
o [2048, 4096], one CUDA graph of 12 layers, us per layer, bf16 -> int4 with its input norm as a launch of its own):
1 row 16.0 -> 11.9, 2 rows 21.4 -> 13.4, 8 rows 20.9 -> 24.3.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton

from moemesh.runtime.gpu import fused_moe
from moemesh.runtime.gpu.int4_prefill import dequantize_into
from moemesh.runtime.quant import QuantTensor

GEMV_MAX_ROWS = 2
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # CPU tensors run the kernel interpreted (tests)


def gemv_config(w: QuantTensor, rows: int) -> dict:
    """The GEMV tile for a [1, N, K] weight. int4: BLOCK_N = 4 per row and per 2,048 columns of K, the whole row in
    at most two K steps of 2,048: the best of 24 tiles for both projections at 1 and 2 rows on the H200 (q/k/v 4 and
    8 columns, o 8 and 16; dense_int4.py). fp8 / int8: fused_moe's GEMV default."""
    k = w.shape[-1]
    if w.scheme != "int4":
        return fused_moe.GEMV_DEFAULT["gemv_down"]
    return {"BLOCK_N": 4 * rows * max(1, k // 2048), "BLOCK_K": min(2048, triton.next_power_of_2(k)),
            "num_warps": 4, "num_stages": 2, "UNROLL": True, "WORDS": True, "DP4A": 32}


def quant_linear(x: torch.Tensor, w: QuantTensor, bias: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
    """x [T, K] (CUDA, or CPU under the interpreter), w a QuantTensor [N, K], rows int64 [>= GEMV_MAX_ROWS] of zeros
    (every GEMV row's expert: a buffer kept by the caller, so that no step launches a memset for it) -> [T, N] in
    x's dtype."""
    t, k = x.shape
    stack = w[None]  # [1, N, K]
    n = stack.shape[1]
    if t <= GEMV_MAX_ROWS:
        y = torch.empty(t, n, dtype=x.dtype, device=x.device)
        if t:
            fused_moe.moe_gemv(x.contiguous(), stack, y, rows[:t], 1, gemv_config(stack, t))
        return y if bias is None else y + bias
    if w.scheme == "int4" and x.is_cuda:
        weight = dequantize_into(stack, torch.empty(1, n, k, dtype=x.dtype, device=x.device))[0]  # [N, K]
    else:
        weight = w.dequantize(x.dtype)
    return F.linear(x, weight, bias)
