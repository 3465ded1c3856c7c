"""Dense projections of a decode step at batch 1-2 (Triton): y [T, N] = x [T, K] @ W^T (+ bias), W [N, K] row-major.

At one or two rows cuBLAS picks split-K GEMMs plus a reduction kernel and reaches ~55% of HBM bandwidth on the
attention projections of a Qwen3-30B-A3B layer (q/k/v 21 MB, o 17 MB; measured on the H200 in a graph replay:
7.9 + 7.1 + 1.7 us). This kernel is a plain GEMV: one program per (row, block of output columns), each streaming
its [BLOCK_N, K] slice of W once with coalesced loads along K, float32 accumulation, one launch. Larger batches read
W once per row here, so they go to cuBLAS (GEMV_MAX_ROWS). norm_linear also folds the residual add + RMSNorm before
the projection into the GEMV's prologue (the decoder layer's input norm: one launch fewer per layer).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from moemesh.runtime.gpu import pdl
from moemesh.runtime.gpu.fused_ops import NORM_FOLD_MAX, add_rms_norm, fold_act, rms_scale
from moemesh.runtime.gpu.pdl import enter

GEMV_MAX_ROWS = 2
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # CPU tensors run the kernels interpreted


# Wide K tiles first: a program that issues its whole [BLOCK_N, K] slice in one or two loads hides HBM latency; a
# loop of narrow K steps serialises it (measured on the H200: BLOCK_K 256 ran the q/k/v GEMV at ~50% of bandwidth).
CONFIGS = ((1, 2048, 4, 1), (1, 4096, 4, 1), (2, 2048, 2, 1), (2, 2048, 4, 1), (4, 2048, 4, 1), (4, 2048, 8, 1),
           (8, 1024, 4, 2), (2, 4096, 8, 1), (4, 1024, 4, 2), (8, 2048, 8, 1), (16, 512, 4, 3))  # BN, BK, warps, stages
# The folded norm's programs each read their row's x, delta (float32 after the MoE) and norm weight, ~16 KB from
# L2 at H 2048: wider column blocks (fewer programs repeating it) may win there.
NORM_CONFIGS = CONFIGS + ((16, 2048, 8, 1), (16, 1024, 8, 2), (32, 1024, 8, 2))


def _tuned(configs):
    return triton.autotune(configs=[triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
                                    for bn, bk, w, s in configs], key=["n", "k"])


@triton.jit
def _gemv_body(x_ptr, d_ptr, nw_ptr, xo_ptr, w_ptr, b_ptr, y_ptr, n, k, eps, HAS_BIAS: tl.constexpr,
               NORM: tl.constexpr, ADD: tl.constexpr, NORM_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """y[row, cols] for one (row, block of columns); NORM: of rmsnorm(x + d) * nw instead of x (fused_ops.fold_act),
    column block 0 storing x + d into xo."""
    row = tl.program_id(0).to(tl.int64)
    cols = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # [BN] output columns
    col_ok = cols < n
    ks = tl.arange(0, BLOCK_K)
    # The first K step's weights are read before the PDL wait: weights are never written by a decode step, so the
    # load may overlap the end of the kernel before (for the usual whole-K tile, the whole weight stream does).
    w = tl.load(w_ptr + cols[:, None] * k + ks[None, :], mask=col_ok[:, None] & (ks < k)[None, :], other=0.0)
    enter(PDL)  # PDL: launch the next kernel early, wait for the last (pdl.py)
    r = 1.0
    if NORM:  # the row's statistic first: every column block needs all of it
        r = rms_scale(x_ptr + row * k, d_ptr + row * k, k, eps, ADD, NORM_BLOCK)
    stored = tl.where(tl.program_id(1) == 0, k, 0)  # column block 0 stores x'
    x = fold_act(x_ptr + row * k, d_ptr + row * k, nw_ptr, xo_ptr + row * k, xo_ptr, ks, ks < k, r, stored, NORM,
                 ADD, False)  # [BK] float32
    acc = tl.sum(w.to(tl.float32) * x[None, :], 1)
    for k0 in range(BLOCK_K, k, BLOCK_K):
        k_ok = k0 + ks < k
        x = fold_act(x_ptr + row * k, d_ptr + row * k, nw_ptr, xo_ptr + row * k, xo_ptr, k0 + ks, k_ok, r, stored,
                     NORM, ADD, False)  # [BK]
        w = tl.load(w_ptr + cols[:, None] * k + k0 + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * x[None, :], 1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * n + cols, acc.to(y_ptr.dtype.element_ty), mask=col_ok)


@_tuned(CONFIGS)
@triton.jit
def _gemv(x_ptr, w_ptr, b_ptr, y_ptr, n, k, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
          PDL: tl.constexpr = False):
    _gemv_body(x_ptr, x_ptr, x_ptr, x_ptr, w_ptr, b_ptr, y_ptr, n, k, 0.0, HAS_BIAS, False, False, 1, BLOCK_N,
               BLOCK_K, PDL)


@_tuned(NORM_CONFIGS)  # its own tuning: the prologue shifts the best column block
@triton.jit
def _gemv_norm(x_ptr, d_ptr, nw_ptr, xo_ptr, w_ptr, b_ptr, y_ptr, n, k, eps, HAS_BIAS: tl.constexpr,
               ADD: tl.constexpr, NORM_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               PDL: tl.constexpr = False):
    _gemv_body(x_ptr, d_ptr, nw_ptr, xo_ptr, w_ptr, b_ptr, y_ptr, n, k, eps, HAS_BIAS, True, ADD, NORM_BLOCK,
               BLOCK_N, BLOCK_K, PDL)


def _usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The GEMV kernels take x [T, K]: T <= GEMV_MAX_ROWS on CUDA (or CPU tensors under Triton's interpreter) with
    a contiguous weight in x's dtype."""
    return (x.shape[0] <= GEMV_MAX_ROWS and (x.is_cuda or INTERPRETED) and weight.dtype == x.dtype
            and weight.is_contiguous())


def _launch(kernel, t: int, n: int, k: int, *args, **kw) -> None:
    """One program per (row, block of columns): autotuned on CUDA; under Triton's interpreter (CPU tests) the
    autotuner cannot time, so one fixed config there (the same for _gemv and _gemv_norm: the same bits)."""
    if args[0].is_cuda:
        grid = lambda meta: (t, triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731 -- Triton's grid callable
        kernel[grid](*args, **kw, **pdl.launch())
    else:
        kernel.fn[(t, triton.cdiv(n, 4))](*args, **kw, BLOCK_N=4, BLOCK_K=min(128, triton.next_power_of_2(k)))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [T, K]: the GEMV kernel where _usable, cuBLAS otherwise."""
    t, k = x.shape
    n = weight.shape[0]
    if not _usable(x, weight):
        return F.linear(x, weight, bias)
    x = x.contiguous()
    y = torch.empty(t, n, dtype=x.dtype, device=x.device)
    if t:
        _launch(_gemv, t, n, k, x, weight, bias if bias is not None else x, y, n, k, HAS_BIAS=bias is not None)
    return y


def norm_linear(x: torch.Tensor, delta: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                weight: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """fused_ops.add_rms_norm(x, delta, norm_weight, eps) then linear(h, weight, bias), the norm folded into the
    GEMV's prologue (one launch; same bits) at GEMV sizes: x, delta [T, K] -> (x' = x + delta [T, K], y [T, N]).
    Every program normalises its row itself (from L2); column block 0 stores x'. Larger T: the two kernels."""
    t, k = x.shape
    n = weight.shape[0]
    if not _usable(x, weight) or k > NORM_FOLD_MAX or not t:
        x, h = add_rms_norm(x, delta, norm_weight, eps)
        return x, linear(h, weight, bias)
    x = x.contiguous()
    y = torch.empty(t, n, dtype=x.dtype, device=x.device)
    summed = torch.empty_like(x) if delta is not None else x
    _launch(_gemv_norm, t, n, k, x, delta.contiguous() if delta is not None else x, norm_weight, summed, weight,
            bias if bias is not None else x, y, n, k, eps, HAS_BIAS=bias is not None, ADD=delta is not None,
            NORM_BLOCK=triton.next_power_of_2(k))
    return summed, y
