"""Fused MoE on the GPU (Triton), no host synchronisation: the routed experts of one layer in two grouped GEMMs.

    hidden [T, H], local ids [T, K], weights [T, K]
      -> align (moe_align.py): pair ids sorted by expert, padded per expert to BLOCK_M rows
      -> kernel 1, GATED: act[p] = silu(hidden[p // K] @ gate_e^T) * (hidden[p // K] @ up_e^T)     # [P, I]
      -> kernel 2, WEIGHTED: y[p] = weight[p] * (act[p] @ down_e^T)                              # [P, H] fp32
      -> out[t] = sum_k y[t*K + k]                                                               # [T, H] fp32

Each program computes one BLOCK_M x BLOCK_N tile of one expert's rows, so an expert's weights are read once per
row block: at decode sizes the kernels stream each selected expert's weights once (memory bound). Block shapes come
from configs/*.json, tuned per token count on the target GPU (benchmarks/moe_kernel.py writes them), as vLLM does.
Pairs of experts not hosted here are never computed; their rows of y stay zero.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
import triton
import triton.language as tl

from moemesh.runtime.gpu.moe_align import SMALL_PAIRS, Alignment, align, align_small

CONFIG_DIR = Path(__file__).parent / "configs"
CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")


@triton.jit
def _moe_gemm(a_ptr, b_ptr, c_ptr, weight_ptr, sorted_ptr, expert_ptr, rows_used_ptr,
              num_pairs, em, n_out, k_in, stride_am, stride_be, stride_bn, stride_cm, up_rows,
              A_DIV: tl.constexpr, GATED: tl.constexpr, WEIGHTED: tl.constexpr, EVEN_K: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """C[pair] = A[pair // A_DIV] @ B_e^T (B [E, n_out (+ up_rows), k_in], k contiguous), per row block of one expert.
    GATED: C = silu(A @ gate^T) * (A @ up^T), up rows start at up_rows. WEIGHTED: C *= weight[pair]."""
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(em, BLOCK_M), tl.cdiv(n_out, BLOCK_N)
    group = GROUP_M * num_n  # programs sharing a group of row blocks walk n first (L2 reuse of A)
    first_m = (pid // group) * GROUP_M
    group_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_m
    pid_n = (pid % group) // group_m
    if pid_m * BLOCK_M >= tl.load(rows_used_ptr):
        return  # past the padded rows in use this step (the grid is sized for the worst case)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ptr + rows)  # [BM] int64; num_pairs marks padding
    row_ok = pair < num_pairs
    expert = tl.load(expert_ptr + pid_m)
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    col_ok = cols < n_out
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (pair // A_DIV)[:, None] * stride_am + ks[None, :]  # [BM, BK]
    b_ptrs = b_ptr + expert * stride_be + cols[None, :] * stride_bn + ks[:, None]  # [BK, BN]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k_in, BLOCK_K):
        k_ok = ks < k_in - k0
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=col_ok[None, :], other=0.0)
        else:
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc)
        if GATED:
            up_ptrs = b_ptrs + up_rows * stride_bn
            if EVEN_K:
                u = tl.load(up_ptrs, mask=col_ok[None, :], other=0.0)
            else:
                u = tl.load(up_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc_up = tl.dot(a, u, acc_up)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if GATED:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up  # silu(gate) * up, in float32 before the one rounding
    if WEIGHTED:
        acc = acc * tl.load(weight_ptr + pair, mask=row_ok, other=0.0)[:, None]
    c_ptrs = c_ptr + pair[:, None] * stride_cm + cols[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _moe_gemv(a_ptr, b_ptr, c_ptr, weight_ptr, ids_ptr, n_out, k_in, stride_am, stride_be, stride_bn, stride_cm,
              up_rows, A_DIV: tl.constexpr, GATED: tl.constexpr, WEIGHTED: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr):
    """Few tokens (decode at batch 1-4): one program per (pair, column block), a dot product per output column, no
    alignment and no tensor cores; many more programs in flight than the row-block GEMM has at this size."""
    pair = tl.program_id(0).to(tl.int64)
    cols = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    col_ok = cols < n_out
    expert = tl.load(ids_ptr + pair)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if expert >= 0:  # hosted elsewhere (-1): the row stays zero
        ks = tl.arange(0, BLOCK_K)
        a_row = a_ptr + (pair // A_DIV) * stride_am
        w_rows = b_ptr + expert * stride_be + cols[:, None] * stride_bn  # [BN, 1]
        for k0 in range(0, k_in, BLOCK_K):
            k_ok = ks + k0 < k_in
            x = tl.load(a_row + k0 + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :]  # [1, BK]
            mask = col_ok[:, None] & k_ok[None, :]
            acc += tl.sum(tl.load(w_rows + k0 + ks[None, :], mask=mask, other=0.0).to(tl.float32) * x, 1)
            if GATED:
                up = tl.load(w_rows + up_rows * stride_bn + k0 + ks[None, :], mask=mask, other=0.0)
                acc_up += tl.sum(up.to(tl.float32) * x, 1)
        if GATED:
            acc = acc / (1.0 + tl.exp(-acc)) * acc_up
        if WEIGHTED:
            acc = acc * tl.load(weight_ptr + pair)
    tl.store(c_ptr + pair * stride_cm + cols, acc.to(c_ptr.dtype.element_ty), mask=col_ok)


GEMV_MAX_PAIRS = 32  # up to this many (token, slot) pairs the GEMV kernel runs (experts are then mostly distinct)
GEMV_DEFAULT = {"gemv_gate_up": {"BLOCK_N": 16, "BLOCK_K": 256, "num_warps": 4, "num_stages": 3},
                "gemv_down": {"BLOCK_N": 32, "BLOCK_K": 256, "num_warps": 4, "num_stages": 3}}


def moe_gemv(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, ids: torch.Tensor, a_div: int, cfg: dict,
             weights: torch.Tensor | None = None, up_rows: int = 0) -> torch.Tensor:
    """One launch of _moe_gemv: out [P, n_out] fully written (zeros for pairs hosted elsewhere)."""
    n_out, k_in = out.shape[1], a.shape[1]
    _moe_gemv[(ids.numel(), triton.cdiv(n_out, cfg["BLOCK_N"]))](
        a, w, out, weights if weights is not None else out, ids, n_out, k_in, a.stride(0), w.stride(0), w.stride(1),
        out.stride(0), up_rows, A_DIV=a_div, GATED=up_rows > 0, WEIGHTED=weights is not None,
        BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


def default_config(tokens: int, kind: str) -> dict[str, int]:
    """Untuned fallback: small row blocks when experts get few rows (decode), larger tiles for prefill."""
    if tokens <= 64:
        return {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 1, "num_warps": 4, "num_stages": 4}
    if tokens <= 512:
        return {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 4, "num_stages": 3}
    return {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8 if kind == "down" else 4,
            "num_stages": 3}


def config_name(num_experts: int, inter: int, hidden: int, dtype: torch.dtype, device_name: str) -> str:
    dev = device_name.replace(" ", "_")
    return f"E={num_experts},I={inter},H={hidden},dtype={str(dtype).removeprefix('torch.')},device={dev}.json"


@functools.lru_cache(maxsize=None)
def _tuned(name: str) -> dict[int, dict[str, dict[str, int]]]:
    path = CONFIG_DIR / name
    if not path.is_file():
        return {}
    return {int(m): entry for m, entry in json.loads(path.read_text(encoding="utf-8")).items()}


@functools.lru_cache(maxsize=None)
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def pick_config(tokens: int, kind: str, w_gate_up: torch.Tensor) -> dict[str, int]:
    """Tuned config of the nearest token count for this shape and GPU, else default_config."""
    e, two_i, h = w_gate_up.shape
    device = _device_name(w_gate_up.device.index or 0) if w_gate_up.is_cuda else "cpu"  # cpu: Triton's interpreter
    table = _tuned(config_name(e, two_i // 2, h, w_gate_up.dtype, device))
    if kind.startswith("gemv"):
        return next((table[m][kind] for m in sorted(table) if kind in table[m]), GEMV_DEFAULT[kind])
    if not table:
        return default_config(tokens, kind)
    return table[min(table, key=lambda m: abs(m - tokens))][kind]


def moe_gemm(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, al: Alignment, a_div: int, cfg: dict,
             weights: torch.Tensor | None = None, up_rows: int = 0) -> torch.Tensor:
    """One launch of _moe_gemm; out [P, n_out] (rows of pairs not computed are left as they were)."""
    n_out, k_in = out.shape[1], a.shape[1]
    em = al.sorted_ids.numel()
    grid = (triton.cdiv(em, cfg["BLOCK_M"]) * triton.cdiv(n_out, cfg["BLOCK_N"]),)
    _moe_gemm[grid](
        a, w, out, weights if weights is not None else out, al.sorted_ids, al.block_expert, al.rows_used,
        al.num_pairs, em, n_out, k_in, a.stride(0), w.stride(0), w.stride(1), out.stride(0), up_rows,
        A_DIV=a_div, GATED=up_rows > 0, WEIGHTED=weights is not None, EVEN_K=k_in % cfg["BLOCK_K"] == 0,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out


def fused_moe(hidden: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, local_ids: torch.Tensor,
              topk_weights: torch.Tensor, configs: tuple[dict, dict] | None = None) -> torch.Tensor:
    """hidden [T, H] (weights' dtype), w_gate_up [E, 2I, H], w_down [E, H, I], local_ids [T, K] (-1: not hosted),
    topk_weights [T, K] -> [T, H] float32 = sum_k weight * SwiGLU expert. configs: (gate_up, down) overrides."""
    t, k = local_ids.shape
    inter = w_down.shape[2]
    if t * k <= GEMV_MAX_PAIRS and configs is None:
        return _fused_moe_gemv(hidden, w_gate_up, w_down, local_ids, topk_weights)
    cfg_up, cfg_down = configs or (pick_config(t, "gate_up", w_gate_up), pick_config(t, "down", w_gate_up))
    hidden = hidden.contiguous()
    weights = topk_weights.reshape(-1).float().contiguous()  # [P]
    aligner = align_small if t * k <= SMALL_PAIRS else align  # one launch for decode sizes
    al_up = aligner(local_ids, w_gate_up.shape[0], cfg_up["BLOCK_M"])
    act = torch.empty(t * k, inter, dtype=hidden.dtype, device=hidden.device)  # [P, I]
    moe_gemm(hidden, w_gate_up, act, al_up, k, cfg_up, up_rows=inter)
    al_down = al_up if cfg_down["BLOCK_M"] == cfg_up["BLOCK_M"] else aligner(local_ids, w_down.shape[0],
                                                                              cfg_down["BLOCK_M"])
    y = torch.zeros(t * k, hidden.shape[1], dtype=torch.float32, device=hidden.device)  # [P, H]
    moe_gemm(act, w_down, y, al_down, 1, cfg_down, weights=weights)
    return y.view(t, k, -1).sum(dim=1)  # [T, H]


def _fused_moe_gemv(hidden: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, local_ids: torch.Tensor,
                    topk_weights: torch.Tensor) -> torch.Tensor:
    """fused_moe for a few tokens: two GEMV launches and the sum over slots (3 launches in all)."""
    t, k = local_ids.shape
    inter = w_down.shape[2]
    ids = local_ids.reshape(-1).long().contiguous()  # [P]
    hidden = hidden.contiguous()
    act = torch.empty(t * k, inter, dtype=hidden.dtype, device=hidden.device)  # [P, I]
    moe_gemv(hidden, w_gate_up, act, ids, k, pick_config(t, "gemv_gate_up", w_gate_up), up_rows=inter)
    y = torch.empty(t * k, hidden.shape[1], dtype=torch.float32, device=hidden.device)  # [P, H]
    weights = topk_weights.reshape(-1).float().contiguous()
    moe_gemv(act, w_down, y, ids, 1, pick_config(t, "gemv_down", w_gate_up), weights=weights)
    return y.view(t, k, -1).sum(dim=1)  # [T, H]
