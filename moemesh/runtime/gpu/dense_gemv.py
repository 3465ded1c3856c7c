"""Dense projections of a decode step at batch 1-2 (Triton): y [T, N] = x [T, K] @ W^T (+ bias), W [N, K] row-major.

At one or two rows cuBLAS picks split-K GEMMs plus a reduction kernel and reaches ~55% of HBM bandwidth on the
attention projections of a Qwen3-30B-A3B layer (q/k/v 21 MB, o 17 MB; measured on the H200 in a graph replay:
7.9 + 7.1 + 1.7 us). This kernel is a plain GEMV: one program per block of output columns, streaming its
[BLOCK_N, K] slice of W once with coalesced loads along K for all T rows (W is read once, not once per row),
float32 accumulation, one launch. Larger batches go to cuBLAS (GEMV_MAX_ROWS). norm_linear also folds the residual
add + RMSNorm before the projection into the GEMV's prologue (the decoder layer's input norm: one launch fewer).

Configs (BLOCK_N, BLOCK_K, warps) come from a table tuned per (N, K, norm fold, rows) on the target GPU
(configs/dense_gemv,dtype=...,device=....json, written by benchmarks/h200/dense_gemv_sweep.py --write), else from
default_config. Not from triton.autotune: at these few-microsecond kernels its first-call timing picked different
configs in two runs on the H200 (noise), compiled ~14 variants per shape at startup, and made the bits of a step
depend on the run. No split-K: it would need a combine (float32 atomics or a second pass; a last-program combine
was measured slower on the H200, graph 2.67 vs 2.53 ms), and there is no parallelism to win: at BLOCK_N <= 8 the
q/k/v and o GEMVs have >= 256 column blocks for 132 SMs, each issuing its whole weight slice in one load.

Measured on the H200 and not merged, 2026-11-30 (branch splitk-projections, benchmarks/results/splitk-h200.json):
3-128 rows as Triton split-K partials summed by the kernel that reads the projection (add_rms_norm for o, norm_rope_
for q/k/v), 48 layers in one graph, us per layer with that reader, best of 18 tiles: o 9.8-12.0 against cuBLAS's
10.2-12.0, q/k/v 10.0-16.4 against 10.0-12.5 (HBM limits 4.0 / 5.0). In a graph cuBLAS already sits near the latency
floor of one ~20 MB read; ncu's cold-cache 8.6 + 3.7 us for o at 64 rows overstated what its reduction costs.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from moemesh.runtime.gpu import pdl
from moemesh.runtime.gpu.fused_ops import NORM_FOLD_MAX, add_rms_norm, fold_act, rms_scale
from moemesh.runtime.gpu.pdl import enter

GEMV_MAX_ROWS = 2
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # CPU tensors run the kernels interpreted
CONFIG_DIR = Path(__file__).parent / "configs"


@triton.jit
def _row_input(x_ptr, d_ptr, nw_ptr, xo_ptr, ks, k, eps, stored, NORM: tl.constexpr, ADD: tl.constexpr,
               NORM_BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    """The row's first K tile of the GEMV's input, float32 [BLOCK_K], and r (1 / rms of the row; 1.0 without NORM).
    NORM with a whole-K tile (BLOCK_K == NORM_BLOCK = next_pow2(k)): one pass, x (+ d) loaded once, the statistic
    taken from those registers in _add_rms_norm's order (one BLOCK-wide reduction) and h = bf16(bf16(x' r) nw) with
    its roundings. Narrower tiles: rms_scale reads the row first, fold_act each tile again (from L2).
    (Triton 3.6 and 3.9 already merged the two identical loads of rms_scale + fold_act for a whole-K tile: the
    same PTX as this pass. What made the BLOCK_N 1 kernel issue-bound is the normalisation itself, ~16
    operations per element of the row (3 loads, the add, the square-sum, 2 scalings, 6 conversions) in every
    program against 2 per weight of the dot: only wider column blocks amortise it.)"""
    if NORM and BLOCK_K >= NORM_BLOCK:
        x = tl.load(x_ptr + ks, mask=ks < k, other=0.0)  # [BK]
        if ADD:  # x' = x + d in float32, rounded to x's dtype (the residual stream's), as fused_ops._residual
            x = (x.to(tl.float32) + tl.load(d_ptr + ks, mask=ks < k, other=0.0).to(tl.float32)).to(x.dtype)
            tl.store(xo_ptr + ks, x, mask=ks < stored)
        xf = x.to(tl.float32)
        r = tl.rsqrt(tl.sum(xf * xf, 0) / k + eps)
        nw = tl.load(nw_ptr + ks, mask=ks < k, other=0.0).to(tl.float32)
        h = ((xf * r).to(x.dtype).to(tl.float32) * nw).to(x.dtype).to(tl.float32)
    else:
        r = 1.0
        if NORM:
            r = rms_scale(x_ptr, d_ptr, k, eps, ADD, NORM_BLOCK)
        h = fold_act(x_ptr, d_ptr, nw_ptr, xo_ptr, xo_ptr, ks, ks < k, r, stored, NORM, ADD, False)
    return h, r


@triton.jit
def _gemv_body(x_ptr, d_ptr, nw_ptr, xo_ptr, w_ptr, b_ptr, y_ptr, n, k, eps, HAS_BIAS: tl.constexpr,
               NORM: tl.constexpr, ADD: tl.constexpr, ROWS: tl.constexpr, NORM_BLOCK: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """y[rows, cols] for ROWS rows (program_id(0) * ROWS ..) and BLOCK_N columns (program_id(1)); NORM: of
    rmsnorm(x + d) * nw instead of x (column block 0 storing x + d into xo). x, d, xo [T, k]; W [n, k]; y [T, n]."""
    cols = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # [BN] output columns
    col_ok = cols < n
    ks = tl.arange(0, BLOCK_K)
    # The first K tile of W is read before the PDL wait: weights are never written by a decode step, so the load
    # may overlap the end of the kernel before (for the usual whole-K tile, the whole weight stream does).
    w = tl.load(w_ptr + cols[:, None] * k + ks[None, :], mask=col_ok[:, None] & (ks < k)[None, :], other=0.0)
    enter(PDL)  # PDL: launch the next kernel early, wait for the last (pdl.py)
    stored = tl.where(tl.program_id(1) == 0, k, 0)  # column block 0 stores x'
    for i in tl.static_range(ROWS):  # every row against the same W tile in registers
        row = (tl.program_id(0) * ROWS + i).to(tl.int64)
        x, r = _row_input(x_ptr + row * k, d_ptr + row * k, nw_ptr, xo_ptr + row * k, ks, k, eps, stored, NORM,
                          ADD, NORM_BLOCK, BLOCK_K)
        acc = tl.sum(w.to(tl.float32) * x[None, :], 1)  # [BN]
        for k0 in range(BLOCK_K, k, BLOCK_K):  # none for a whole-K tile; a second row re-reads these from L2
            k_ok = k0 + ks < k
            x = fold_act(x_ptr + row * k, d_ptr + row * k, nw_ptr, xo_ptr + row * k, xo_ptr, k0 + ks, k_ok, r,
                         stored, NORM, ADD, False)  # [BK]
            wk = tl.load(w_ptr + cols[:, None] * k + k0 + ks[None, :], mask=col_ok[:, None] & k_ok[None, :],
                         other=0.0)
            acc += tl.sum(wk.to(tl.float32) * x[None, :], 1)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * n + cols, acc.to(y_ptr.dtype.element_ty), mask=col_ok)


# Two kernels of one body, so that profiles (ncu, torch) tell the folded q/k/v GEMV from the plain ones by name.
@triton.jit
def _gemv(x_ptr, d_ptr, nw_ptr, xo_ptr, w_ptr, b_ptr, y_ptr, n, k, eps, HAS_BIAS: tl.constexpr, ADD: tl.constexpr,
          ROWS: tl.constexpr, NORM_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
          PDL: tl.constexpr = False):
    _gemv_body(x_ptr, d_ptr, nw_ptr, xo_ptr, w_ptr, b_ptr, y_ptr, n, k, eps, HAS_BIAS, False, ADD, ROWS, NORM_BLOCK,
               BLOCK_N, BLOCK_K, PDL)


@triton.jit
def _gemv_norm(x_ptr, d_ptr, nw_ptr, xo_ptr, w_ptr, b_ptr, y_ptr, n, k, eps, HAS_BIAS: tl.constexpr,
               ADD: tl.constexpr, ROWS: tl.constexpr, NORM_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr, PDL: tl.constexpr = False):
    _gemv_body(x_ptr, d_ptr, nw_ptr, xo_ptr, w_ptr, b_ptr, y_ptr, n, k, eps, HAS_BIAS, True, ADD, ROWS, NORM_BLOCK,
               BLOCK_N, BLOCK_K, PDL)


def default_config(n: int, k: int, norm: bool) -> dict:
    """Untuned fallback: a whole-K tile up to K 4096 (one load per program hides HBM latency; K loops of 256 ran the
    q/k/v GEMV at ~50% of bandwidth on the H200), ~64 weights per thread, wider column blocks with the norm (each
    program re-reads its row's x, delta and norm weight from L2: 16 KB at K 2048), and >= 256 programs."""
    block_k = min(4096, triton.next_power_of_2(k))
    warps = 8 if norm else 4
    block_n = max(1, 64 * 32 * warps // block_k)
    while block_n > 1 and triton.cdiv(n, block_n) < 256:
        block_n //= 2
    return {"BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": warps, "num_stages": 1}


def table_name(dtype: torch.dtype, device_name: str) -> str:
    return f"dense_gemv,dtype={str(dtype).removeprefix('torch.')},device={device_name.replace(' ', '_')}.json"


def shape_key(n: int, k: int, norm: bool) -> str:
    return f"N={n},K={k},norm={int(norm)}"


@functools.lru_cache(maxsize=None)
def _table(name: str) -> dict:
    """{shape_key: {rows: config}} of configs/<name>, {} when there is none."""
    path = CONFIG_DIR / name
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


@functools.lru_cache(maxsize=None)
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def pick_config(n: int, k: int, rows: int, norm: bool, weight: torch.Tensor) -> dict:
    """The tuned config for this shape, norm fold and row count (the other row count's when only it is tuned) on
    this GPU for the weight's dtype (bfloat16's for float16: the same bytes), else default_config."""
    device = _device_name(weight.device.index or 0) if weight.is_cuda else "cpu"  # cpu: Triton's interpreter
    return _pick(n, k, rows, norm, weight.dtype, device)


@functools.lru_cache(maxsize=None)  # per launch on the host: eager decode steps pay it every layer
def _pick(n: int, k: int, rows: int, norm: bool, dtype: torch.dtype, device: str) -> dict:
    two_bytes = dtype in (torch.bfloat16, torch.float16)
    for name in dict.fromkeys(table_name(d, device) for d in ((dtype, torch.bfloat16) if two_bytes else (dtype,))):
        entry = _table(name).get(shape_key(n, k, norm))
        if entry:
            return entry.get(str(rows)) or next(iter(entry.values()))
    return default_config(n, k, norm)


def _usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The GEMV kernels take x [T, K]: T <= GEMV_MAX_ROWS on CUDA (or CPU tensors under Triton's interpreter) with
    a contiguous weight in x's dtype."""
    return (x.shape[0] <= GEMV_MAX_ROWS and (x.is_cuda or INTERPRETED) and weight.dtype == x.dtype
            and weight.is_contiguous())


def _launch(x, d, nw, xo, weight, bias, y, eps: float, norm: bool, add: bool, config: dict | None) -> None:
    """One launch for all T rows: grid (T / ROWS, N / BLOCK_N), ROWS rows per program (the config's "ROWS", else all
    T: W read once). BLOCK_K is clamped to next_pow2(K) (whole-K tiles). (Measured on the H200 at T=2: the folded
    q/k/v GEMV is faster with one program per row, 11.3 vs 14.5 us, its prologue per row being the cost; the plain
    GEMVs with both rows per program, q/k/v 9.2 vs 9.9 us and o 8.3 vs 8.7.)"""
    (t, k), n = x.shape, weight.shape[0]
    cfg = config or pick_config(n, k, t, norm, weight)
    rows = min(cfg.get("ROWS", t), t)
    if t % rows:
        raise ValueError(f"ROWS {rows} of the GEMV config does not divide the {t} rows")
    block_k = min(cfg["BLOCK_K"], triton.next_power_of_2(k))
    opts = {"num_warps": cfg["num_warps"], "num_stages": cfg.get("num_stages", 1)} if x.is_cuda else {}
    (_gemv_norm if norm else _gemv)[(t // rows, triton.cdiv(n, cfg["BLOCK_N"]))](
        x, d, nw, xo, weight, bias if bias is not None else x, y, n, k, eps, HAS_BIAS=bias is not None, ADD=add,
        ROWS=rows, NORM_BLOCK=triton.next_power_of_2(k), BLOCK_N=cfg["BLOCK_N"], BLOCK_K=block_k,
        **opts, **pdl.launch())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           config: dict | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [T, K]: the GEMV kernel where _usable, cuBLAS otherwise. config: a
    {BLOCK_N, BLOCK_K, num_warps[, num_stages]} instead of the tuned one (the sweep, tests)."""
    t, k = x.shape
    n = weight.shape[0]
    if not _usable(x, weight):
        return F.linear(x, weight, bias)
    x = x.contiguous()
    y = torch.empty(t, n, dtype=x.dtype, device=x.device)
    if t:
        _launch(x, x, x, x, weight, bias, y, 0.0, False, False, config)
    return y


def norm_linear(x: torch.Tensor, delta: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                weight: torch.Tensor, bias: torch.Tensor | None = None,
                config: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """fused_ops.add_rms_norm(x, delta, norm_weight, eps) then linear(h, weight, bias), the norm folded into the
    GEMV's prologue (one launch; same bits) at GEMV sizes: x, delta [T, K] -> (x' = x + delta [T, K], y [T, N]).
    Every program normalises its rows itself (from L2); column block 0 stores x'. Larger T: the two kernels.
    config: as linear's."""
    t, k = x.shape
    if not _usable(x, weight) or k > NORM_FOLD_MAX or not t:
        x, h = add_rms_norm(x, delta, norm_weight, eps)
        return x, linear(h, weight, bias, config)
    x = x.contiguous()
    y = torch.empty(t, weight.shape[0], dtype=x.dtype, device=x.device)
    summed = torch.empty_like(x) if delta is not None else x
    _launch(x, delta.contiguous() if delta is not None else x, norm_weight, summed, weight, bias, y, eps, True,
            delta is not None, config)
    return summed, y
