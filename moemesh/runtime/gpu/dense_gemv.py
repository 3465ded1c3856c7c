"""Dense projections of a decode step at batch 1-2 (Triton): y [T, N] = x [T, K] @ W^T (+ bias), W [N, K] row-major.

At one or two rows cuBLAS picks split-K GEMMs plus a reduction kernel and reaches ~55% of HBM bandwidth on the
attention projections of a Qwen3-30B-A3B layer (q/k/v 21 MB, o 17 MB; measured on the H200 in a graph replay:
7.9 + 7.1 + 1.7 us). This kernel is a plain GEMV: one program per (row, block of output columns), each streaming
its [BLOCK_N, K] slice of W once with coalesced loads along K, float32 accumulation, one launch. Larger batches read
W once per row here, so they go to cuBLAS (GEMV_MAX_ROWS).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from moemesh.runtime.gpu import pdl
from moemesh.runtime.gpu.pdl import enter

GEMV_MAX_ROWS = 2


# Wide K tiles first: a program that issues its whole [BLOCK_N, K] slice in one or two loads hides HBM latency; a
# loop of narrow K steps serialises it (measured on the H200: BLOCK_K 256 ran the q/k/v GEMV at ~50% of bandwidth).
@triton.autotune(
    configs=[triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
             for bn, bk, w, s in ((1, 2048, 4, 1), (1, 4096, 4, 1), (2, 2048, 2, 1), (2, 2048, 4, 1),
                                  (4, 2048, 4, 1), (4, 2048, 8, 1), (8, 1024, 4, 2), (2, 4096, 8, 1),
                                  (4, 1024, 4, 2), (8, 2048, 8, 1), (16, 512, 4, 3))],
    key=["n", "k"],
)
@triton.jit
def _gemv(x_ptr, w_ptr, b_ptr, y_ptr, n, k, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
          PDL: tl.constexpr = False):
    row = tl.program_id(0).to(tl.int64)
    cols = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # [BN] output columns
    col_ok = cols < n
    ks = tl.arange(0, BLOCK_K)
    # The first K step's weights are read before the PDL wait: weights are never written by a decode step, so the
    # load may overlap the end of the kernel before (for the usual whole-K tile, the whole weight stream does).
    w = tl.load(w_ptr + cols[:, None] * k + ks[None, :], mask=col_ok[:, None] & (ks < k)[None, :], other=0.0)
    enter(PDL)  # PDL: launch the next kernel early, wait for the last (pdl.py)
    x = tl.load(x_ptr + row * k + ks, mask=ks < k, other=0.0).to(tl.float32)  # [BK]
    acc = tl.sum(w.to(tl.float32) * x[None, :], 1)
    for k0 in range(BLOCK_K, k, BLOCK_K):
        k_ok = k0 + ks < k
        x = tl.load(x_ptr + row * k + k0 + ks, mask=k_ok, other=0.0).to(tl.float32)  # [BK]
        w = tl.load(w_ptr + cols[:, None] * k + k0 + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * x[None, :], 1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * n + cols, acc.to(y_ptr.dtype.element_ty), mask=col_ok)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [T, K]: the GEMV kernel for T <= GEMV_MAX_ROWS on CUDA with a contiguous
    weight in x's dtype, cuBLAS otherwise."""
    t, k = x.shape
    n = weight.shape[0]
    if t > GEMV_MAX_ROWS or not x.is_cuda or weight.dtype != x.dtype or not weight.is_contiguous():
        return F.linear(x, weight, bias)
    x = x.contiguous()
    y = torch.empty(t, n, dtype=x.dtype, device=x.device)
    if t:
        grid = lambda meta: (t, triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731 -- Triton's grid callable
        _gemv[grid](x, weight, bias if bias is not None else x, y, n, k, HAS_BIAS=bias is not None, **pdl.launch())
    return y
