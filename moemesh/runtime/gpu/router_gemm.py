"""Router logits at decode batch sizes past the GEMV (9-512 rows): x @ W^T in float32, split over K, the splits
summed by the softmax top-k kernel that reads the logits anyway.

    x [T, H] bf16 / fp16, W [E, H] float32
      -> _router_splitk, program (row block, expert block, split s):
           part[s, rows, experts] = x[rows, s-th K block] @ W[experts, s-th K block]^T          # [S, T, E] float32
      -> fused_ops.route_softmax(part): logits = part[0] + part[1] + ... (fixed order: the same bits every step),
           softmax, top-k                                                                        # [T, K] ids, weights

Why: for 64 rows cuBLAS runs a SIMT SGEMM plus its split-K reduction (ncu on the H200: 7.3 + 4.6 us per layer),
two latency-bound launches for 1 MB of weights. Here the products are many short programs (one K block each, its
weight tile loaded before the PDL wait, since weights never change during a step) and the reduction costs the top-k
kernel S loads per row instead of a launch. Products on TF32 tensor cores with W split in two (_router_splitk): within
float32 rounding of Router's float32 linear for bf16 activations.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moemesh.runtime.gpu import pdl
from moemesh.runtime.gpu.fused_ops import ROUTER_GEMV_MAX_TOKENS, router_logits
from moemesh.runtime.gpu.pdl import enter

MAX_TOKENS = 512  # timed at 64 and 128 rows (4.4 / 5.0 us, ncu); past 512 rows cuBLAS, not compared
BLOCK_T, BLOCK_E, BLOCK_K = 16, 32, 128


@triton.jit
def _router_splitk(x_ptr, w_ptr, part_ptr, t, e, h, stride_x, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
                   BLOCK_K: tl.constexpr, PDL: tl.constexpr = False):
    experts = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)  # [BE]
    split = tl.program_id(2)
    ks = split * BLOCK_K + tl.arange(0, BLOCK_K)  # [BK]
    k_ok = ks < h
    w = tl.load(w_ptr + experts[:, None] * h + ks[None, :], mask=(experts[:, None] < e) & k_ok[None, :],
                other=0.0)  # [BE, BK] float32, before the wait: the weights are not written during a step
    enter(PDL)  # PDL: launch the next kernel early, wait for the last (pdl.py); x is the last kernel's output
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    x = tl.load(x_ptr + rows[:, None] * stride_x + ks[None, :], mask=(rows[:, None] < t) & k_ok[None, :],
                other=0.0).to(tl.float32)  # [BT, BK]
    # Two TF32 tensor-core products instead of float32 FMA (which Triton runs at ~5% of the FMA rate: 12.4 us at 64
    # rows on the H200): x is bf16, exact in TF32; W = hi + lo with hi W's top 10 mantissa bits, lo the rest (exact
    # in float32, rounded to TF32's 10 bits in the dot): ~21 of float32's 24 bits, products exact, sums float32.
    hi = (w.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)  # [BE, BK], low 13 bits cleared
    acc = tl.dot(x, tl.trans(hi), input_precision="tf32")  # [BT, BE]
    acc = tl.dot(x, tl.trans(w - hi), acc, input_precision="tf32")
    tl.store(part_ptr + (split * t + rows[:, None]) * e + experts[None, :], acc,
             mask=(rows[:, None] < t) & (experts[None, :] < e))


def partials(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [T, H] (unit stride along H), weight [E, H] float32 contiguous -> [S, T, E] float32 with
    sum over S = x.float() @ weight^T; S = ceil(H / BLOCK_K)."""
    t, h = x.shape
    e = weight.shape[0]
    splits = triton.cdiv(h, BLOCK_K)
    part = torch.empty(splits, t, e, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(t, BLOCK_T), triton.cdiv(e, BLOCK_E), splits)
    _router_splitk[grid](x, weight, part, t, e, h, x.stride(0), BLOCK_T=BLOCK_T, BLOCK_E=BLOCK_E, BLOCK_K=BLOCK_K,
                         num_warps=4, **pdl.launch())
    return part


def logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The gate's logits for route_softmax: [T, E] (the GEMV up to ROUTER_GEMV_MAX_TOKENS rows, cuBLAS past
    MAX_TOKENS or for float32 x) or, in between, their split-K partial sums [S, T, E], which route_softmax adds."""
    t = x.shape[0]
    exact = x.dtype in (torch.bfloat16, torch.float16)  # activations TF32 holds exactly
    if ROUTER_GEMV_MAX_TOKENS < t <= MAX_TOKENS and exact and weight.is_contiguous() and x.stride(-1) == 1:
        return partials(x, weight)
    return router_logits(x, weight)
