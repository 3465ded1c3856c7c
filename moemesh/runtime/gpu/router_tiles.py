"""Router logits for a batch of decode rows (9 to ROUTER_TILE_MAX_TOKENS): logits [T, E] float32 = x.float() @ W^T
with W [E, H] float32, as a Triton tiled GEMM on tensor cores at float32 accuracy ("2xTF32").

fused_ops.router_logits runs rows up to 8 as a GEMV (one program per row and expert). Beyond, it used cuBLAS: a cast
of x to float32, then a SIMT SGEMM split over K and its reduction kernel, 3 launches and 12 us per layer at 64 rows on
the H200 (Qwen3-30B-A3B shape, ncu: 7.3 + 4.6, benchmarks/results/ncu-step-h200-fp8-b64.md). Here one launch:

    x [T, H] bf16 / fp16 -> tiles [BLOCK_T, BLOCK_K], exact in TF32 (8 / 11 significant bits of TF32's 11)
    W [E, H] float32      -> tiles [BLOCK_E, BLOCK_K] split w = hi + lo, hi = w with its low 13 mantissa bits cleared
                             (a TF32 value), lo = w - hi (exact in float32, |lo| < 2^-10 |w|)
      -> acc [BLOCK_T, BLOCK_E] += x @ hi^T + x @ lo^T  (two TF32 tensor-core dots)      # float32
      -> logits[rows, experts]
Each product misses only lo's own rounding to TF32: 2^-21 of |x w| against float32's 2^-24, in a float32 sum over H.
(Measured on the H200 and replaced, 2026-11-30: the same tiles with float32 FMA dots (input_precision "ieee"), 49.7
us per layer at 64 rows: Triton stages every FMA dot operand through shared memory.) float32 x takes cuBLAS.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ROUTER_TILE_MAX_TOKENS = 1024  # beyond (prefill chunks), cuBLAS's SGEMM has the SMs to itself
BLOCK_T, BLOCK_E, BLOCK_K = 16, 16, 256  # 8 K steps at H 2048 (BLOCK_K 64: 32 steps, 18.3 us at 64 rows, latency-bound)


@triton.jit
def _router_tiles(x_ptr, w_ptr, out_ptr, t, e, h, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    experts = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)  # [BE]
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows.to(tl.int64)[:, None] * h + ks[None, :]  # [BT, BK]
    w_ptrs = w_ptr + experts.to(tl.int64)[:, None] * h + ks[None, :]  # [BE, BK]
    acc = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    for k0 in range(0, h, BLOCK_K):
        k_ok = (ks < h - k0)[None, :]
        x = tl.load(x_ptrs, mask=(rows < t)[:, None] & k_ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptrs, mask=(experts < e)[:, None] & k_ok, other=0.0)
        hi = (w.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)  # [BE, BK], TF32 values
        acc = tl.dot(x, tl.trans(hi), acc, input_precision="tf32")
        acc = tl.dot(x, tl.trans(w - hi), acc, input_precision="tf32")
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    tl.store(out_ptr + rows[:, None] * e + experts[None, :], acc, mask=(rows < t)[:, None] & (experts < e)[None, :])


def router_tiles(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [T, H] contiguous (any float dtype), weight [E, H] float32 contiguous -> logits [T, E] float32."""
    t, h = x.shape
    e = weight.shape[0]
    out = torch.empty(t, e, dtype=torch.float32, device=x.device)
    if t:
        _router_tiles[(triton.cdiv(t, BLOCK_T), triton.cdiv(e, BLOCK_E))](
            x, weight, out, t, e, h, BLOCK_T=BLOCK_T, BLOCK_E=BLOCK_E, BLOCK_K=BLOCK_K, num_warps=4, num_stages=3)
    return out
