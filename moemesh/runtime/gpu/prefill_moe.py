"""Fused MoE for prefill-sized token counts (Hopper): pre-permuted rows, TMA loads, wgmma, persistent grids.

fused_moe.py gathers each A row through the sorted pair ids with pointer loads, one program per tile: 292 TFLOP/s
(29% of the 989 bf16 spec) at 4,096 tokens on the H200 (benchmarks/results/moe-kernel-h200-limits.md). Here the rows
are permuted once, so every GEMM operand is a plain 2D tile that Hopper's TMA engine copies into shared memory:

    hidden [T, H], local ids [T, K], weights [T, K]
      -> permute (prefill_permute.py): sorted_ids [EM] (pair p = t*K + k per row, P = padding), block_expert
                         [EM / BM], A[r] = hidden[sorted_ids[r] // K]                # [EM, H]; inv[p] = r  # [P]
      -> _gate_up_gemm:  act[r] = silu(A[r] @ gate_e^T) * (A[r] @ up_e^T)         # [EM, I] bf16
      -> _down_gemm:     y[r] = weight[p] * (act[r] @ down_e^T)                      # [EM, H] bf16 ("gather")
                         or out[p // K] += that, float32 atomics                      # ("atomic")
      -> gather_sum:     out[t] = sum_k y[inv[t*K + k]]                              # [T, H] float32 ("gather")

Both GEMMs are persistent: NUM_SMS programs walk the tiles (tile -> row block -> expert through block_expert),
stopping at rows_used (read on the device: no host sync, graph-capturable). Tiles of GROUP_M row blocks walk N
first, so the row blocks of one expert (~2 at 4,096 tokens x top-8 over 128 experts) share each weight tile in L2.
Weights must be bf16/fp16 tensors (fp8 ones: prefill_fp8.py; others keep fused_moe), with I and H multiples of the N
and K blocks (a weight tile must not run into the next expert's rows); `usable` says why not otherwise.

fused_moe.fused_moe hands every call `wanted` accepts to prefill_moe (MOEMESH_PREFILL_TMA=0 turns it off);
benchmarks/h200/prefill_tma.py measures it beside fused_moe's row-block GEMM and torch._grouped_mm.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from moemesh.runtime.gpu import pdl
from moemesh.runtime.gpu.pdl import enter
from moemesh.runtime.gpu.moe_align import Alignment
from moemesh.runtime.gpu.prefill_permute import gather_sum, permute, permute_fused

# From 1,024 tokens on (H200, benchmarks/results/prefill-tma-h200.md): 1.8x fused_moe's row-block GEMM at 1,024
# tokens, 1.5x at 4,096, 1.5x at 16,384. MOEMESH_PREFILL_TMA=0 turns it off.
PREFILL_MIN_TOKENS = 1024
ENABLED = os.environ.get("MOEMESH_PREFILL_TMA", "1") == "1"
# H200 starting points (benchmarks/h200/prefill_tma.py sweeps around them); gate_up's tile is [BM, 2 BN] wide.
# FUSED_GU: gate and up tiles in one TMA copy and one dot (with two, ptxas serializes the wgmmas of the flattened
# loop on sm_90: warning C7515). FLATTEN: the tile loop and the K loop pipelined as one, so the next tile's loads
# overlap this tile's epilogue.
DEFAULT_GATE_UP = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3,
                   "FUSED_GU": True, "FLATTEN": True}
DEFAULT_DOWN = {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3,
                "FLATTEN": True}
# Options, off by default: the whole layer at 4,096 tokens on the H200 (Triton 3.6, one run of
# benchmarks/h200/prefill_tma.py, benchmarks/results/prefill-tma-h200-variants.md) took 744 us with the defaults,
# 714 with EPI_SPLIT, 721 with PDL: equal within noise (fused_moe, which calls these defaults, took 717 in that run).
# EPI_SPLIT (down): the y tile stored as two [BM, BN / 2] halves (half the staging buffer, so BN 256 fits 4 stages;
#   that run also copied the weight tile as two [BN / 2, BK] boxes, dropped with the 512-wide tiles they allowed).
# PDL (either GEMM; down's also sets the gather-sum's): programmatic dependent launch, see _pdl.
# Dropped after that run, 1.4-1.6x slower: gate_up gathering hidden's rows itself instead of the permuted copy
# (1,052 us), and BM 64 x [64, 512] tiles (1,019 us).
# The atomic combine's float32 epilogue does not fit a 256-wide tile in shared memory (278 KB > 227 KB).
# Measured 2026-11-30 and not taken: Triton 3.6's automatic warp specialization on Hopper (tl.range(...,
# warp_specialize=True), 4 warps, no FLATTEN, the descriptors made in the kernel: host-made ones fail its data
# partitioning, as does the fused gate/up tile's reshape). 4,096 tokens, each GEMM alone: gate_up 401 -> 381 us with
# [128, 128] x BK 128, 2 stages, exact, but its BK 64 configs (3 and 4 stages) returned NaN; down 233 -> 229 us.
# Measured 2026-11-30 and not taken (branch prefill-mixed-tiles, benchmarks/results/prefill-tma-h200-mixed.md): less
# padding with mixed tiles, each expert's run padded to 64 rows and covered by [128, .] tiles plus one [64, .] tile
# for an odd last block, both in one persistent kernel (padded rows at 4,096 tokens: 1.23 -> 1.12x the pairs). Exact,
# but slower: 798 vs 753 us for the layer, with EPI_SPLIT 772 vs 710.
ATOMIC_DOWN = {**DEFAULT_DOWN, "BLOCK_N": 128, "num_stages": 4}


@triton.jit
def _tile(tile, num_m, num_n, expert_ptr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(first row, first column, expert) of a tile: groups of GROUP_M row blocks, N walked first in a group."""
    group = GROUP_M * num_n
    first_m = (tile // group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (tile % group) % size_m
    expert = tl.load(expert_ptr + pid_m).to(tl.int32)
    return pid_m * BLOCK_M, (tile % group) // size_m * BLOCK_N, expert


@triton.jit
def _gate_up_gemm(a_desc, w_desc, w2_desc, act_desc, expert_ptr, rows_used_ptr, inter, k_in,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                  NUM_SMS: tl.constexpr, FLATTEN: tl.constexpr, FUSED_GU: tl.constexpr, PDL: tl.constexpr = False):
    """act = silu(A @ gate^T) * (A @ up^T) per [BM, BN] tile. w_desc: gate_up as [E * 2I, H] rows, block
    [BN, BK]. FUSED_GU: w2_desc is gate_up as [E, 2, I, H], block [1, 2, BN, BK] (gate and up tiles in one TMA copy,
    one [BM, 2 BN] wgmma), else the gate and up tiles are two copies and two dots."""
    enter(PDL)  # PDL: launch the next kernel early, wait for the last (pdl.py)
    num_m = (tl.load(rows_used_ptr) // BLOCK_M).to(tl.int32)
    num_n = inter // BLOCK_N
    for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_SMS, flatten=FLATTEN):
        row0, n0, expert = _tile(tile, num_m, num_n, expert_ptr, BLOCK_M, BLOCK_N, GROUP_M)
        if FUSED_GU:
            acc = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32)
            for k0 in range(0, k_in, BLOCK_K):
                a = a_desc.load([row0, k0])  # [BM, BK]
                w = w2_desc.load([expert, 0, n0, k0]).reshape(2 * BLOCK_N, BLOCK_K)  # [gate; up] rows
                acc = tl.dot(a, w.T, acc)
            gate, up = acc.reshape(BLOCK_M, 2, BLOCK_N).permute(0, 2, 1).split()  # [BM, BN] each
        else:
            gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            w_row = expert * 2 * inter + n0
            for k0 in range(0, k_in, BLOCK_K):
                a = a_desc.load([row0, k0])  # [BM, BK]
                gate = tl.dot(a, w_desc.load([w_row, k0]).T, gate)
                up = tl.dot(a, w_desc.load([w_row + inter, k0]).T, up)
        act = gate / (1.0 + tl.exp(-gate)) * up  # silu(gate) * up in float32, one rounding
        act_desc.store([row0, n0], act.to(act_desc.dtype))


@triton.jit
def _down_gemm(act_desc, w_desc, y_desc, out_ptr, sorted_ptr, weight_ptr, expert_ptr, rows_used_ptr, num_pairs,
               hidden, k_in, TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr, FLATTEN: tl.constexpr,
               ATOMIC: tl.constexpr, EPI_SPLIT: tl.constexpr, PDL: tl.constexpr = False):
    """y = weight[pair] * (act @ down^T) per [BM, BN] tile; w_desc: down as [E * H, I] rows, block [BN, BK].
    ATOMIC: add the tile into out[pair // K] (float32, zeroed by the caller), else store it to y (bf16 rows;
    EPI_SPLIT: y_desc's block is [BM, BN / 2])."""
    enter(PDL)  # PDL: launch the next kernel early, wait for the last (pdl.py)
    num_m = (tl.load(rows_used_ptr) // BLOCK_M).to(tl.int32)
    num_n = hidden // BLOCK_N
    for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_SMS, flatten=FLATTEN):
        row0, n0, expert = _tile(tile, num_m, num_n, expert_ptr, BLOCK_M, BLOCK_N, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, k_in, BLOCK_K):
            acc = tl.dot(act_desc.load([row0, k0]), w_desc.load([expert * hidden + n0, k0]).T, acc)
        pair = tl.load(sorted_ptr + row0 + tl.arange(0, BLOCK_M))  # [BM] int64; num_pairs on padding rows
        ok = pair < num_pairs
        acc = acc * tl.load(weight_ptr + pair, mask=ok, other=0.0)[:, None]
        if ATOMIC:
            cols = n0 + tl.arange(0, BLOCK_N)
            mask = ok[:, None] & (cols < hidden)[None, :]  # a full [BM, BN] mask (Triton's interpreter)
            tl.atomic_add(out_ptr + (pair // TOP_K)[:, None] * hidden + cols[None, :], acc, mask=mask,
                          sem="relaxed")
        elif EPI_SPLIT:  # two [BM, BN / 2] stores: half the shared-memory staging tile, room for a deeper pipeline
            left, right = acc.reshape(BLOCK_M, 2, BLOCK_N // 2).permute(0, 2, 1).split()
            y_desc.store([row0, n0], left.to(y_desc.dtype))
            y_desc.store([row0, n0 + BLOCK_N // 2], right.to(y_desc.dtype))
        else:
            y_desc.store([row0, n0], acc.to(y_desc.dtype))


def usable(hidden: torch.Tensor, w_gate_up, w_down, cfg_up: dict = DEFAULT_GATE_UP,
           cfg_down: dict = DEFAULT_DOWN) -> str:
    """'' when prefill_moe can run these operands with these configs, else why not."""
    if not isinstance(w_gate_up, torch.Tensor) or not isinstance(w_down, torch.Tensor):
        return "quantized experts (prefill_moe takes bf16/fp16 weights)"
    if not (w_gate_up.is_contiguous() and w_down.is_contiguous()):
        return "non-contiguous expert weights (the TMA descriptors view them as 2D rows)"
    if w_gate_up.dtype != hidden.dtype or w_down.dtype != hidden.dtype or hidden.dtype not in (torch.bfloat16,
                                                                                                   torch.float16):
        return f"dtypes {hidden.dtype} / {w_gate_up.dtype} / {w_down.dtype} (one of bf16, fp16 for all)"
    return tile_problem(w_down, cfg_up, cfg_down)


def tile_problem(w_down, cfg_up: dict, cfg_down: dict) -> str:
    """'' when the experts' I and H (w_down [E, H, I]) tile by both GEMMs' blocks and the two share BLOCK_M, else
    why not (prefill_moe.usable and prefill_fp8.usable)."""
    inter, h = w_down.shape[2], w_down.shape[1]
    for name, size, block in (("I", inter, cfg_up["BLOCK_N"]), ("H", h, cfg_up["BLOCK_K"]),
                              ("H", h, cfg_down["BLOCK_N"]), ("I", inter, cfg_down["BLOCK_K"])):
        if size % block:
            return f"{name} {size} is not a multiple of the block {block}"
    if cfg_up["BLOCK_M"] != cfg_down["BLOCK_M"]:
        return f"BLOCK_M differs between gate_up ({cfg_up['BLOCK_M']}) and down ({cfg_down['BLOCK_M']})"
    return ""


def wanted(hidden: torch.Tensor, w_gate_up, w_down) -> bool:
    """Whether fused_moe should hand this call to prefill_moe: enabled, enough tokens, Hopper or newer (TMA), and
    operands prefill_moe takes."""
    if not ENABLED or hidden.shape[0] < PREFILL_MIN_TOKENS or not hidden.is_cuda:
        return False
    return torch.cuda.get_device_capability(hidden.device)[0] >= 9 and usable(hidden, w_gate_up, w_down) == ""


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # Triton's interpreter: a few programs, each walking several tiles
    return torch.cuda.get_device_properties(device).multi_processor_count


def prefill_moe(hidden: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, local_ids: torch.Tensor,
                topk_weights: torch.Tensor, configs: tuple[dict, dict] | None = None,
                combine: str = "gather", fused_permute: bool = True) -> torch.Tensor:
    """fused_moe's contract: hidden [T, H], w_gate_up [E, 2I, H], w_down [E, H, I], local_ids [T, K] (-1: not
    hosted), topk_weights [T, K] -> [T, H] float32. combine: "gather" (bf16 rows + a gather-sum kernel) or "atomic"
    (float32 atomics in the down GEMM). configs: (gate_up, down) block configs as DEFAULT_GATE_UP / DEFAULT_DOWN.
    fused_permute: prefill_permute.permute_fused (3 launches), else moe_align's alignment + a copy kernel.
    Raises ValueError when `usable` says no."""
    cfg_up, cfg_down = configs or (DEFAULT_GATE_UP, ATOMIC_DOWN if combine == "atomic" else DEFAULT_DOWN)
    reason = usable(hidden, w_gate_up, w_down, cfg_up, cfg_down)
    if reason or combine not in ("gather", "atomic"):
        raise ValueError(f"prefill_moe: {reason or f'combine {combine!r} (gather or atomic)'}")
    t, k = local_ids.shape
    e, two_i, h = w_gate_up.shape
    inter, bm, dev = two_i // 2, cfg_up["BLOCK_M"], hidden.device
    al, a, inv = (permute_fused if fused_permute else permute)(hidden, local_ids, e, bm)
    em = al.sorted_ids.numel()
    act = torch.empty(em, inter, dtype=hidden.dtype, device=dev)  # [EM, I]
    # every torch launch before gate_up: between the GEMMs it would break the PDL chain (cfg["PDL"])
    weights = topk_weights.reshape(-1).float().contiguous()  # [P]
    out = (torch.zeros if combine == "atomic" else torch.empty)(t, h, dtype=torch.float32, device=dev)  # [T, H]
    y = torch.empty(em if combine == "gather" else bm, h, dtype=hidden.dtype, device=dev)  # [EM, H] (gather)
    launch_gate_up(a, w_gate_up, act, al, cfg_up)
    launch_down(act, w_down, y, out, weights, al, k, cfg_down, atomic=combine == "atomic")
    if combine == "gather":
        gather_sum(y, inv, local_ids, out, **_pdl(cfg_down))
    return out


def launch_gate_up(a: torch.Tensor, w_gate_up: torch.Tensor, act: torch.Tensor, al: Alignment, cfg: dict) -> None:
    """act [EM, I] = silu(A @ gate^T) * (A @ up^T) for the row blocks in use; a [EM, H] from permute."""
    e, two_i, h = w_gate_up.shape
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    w2 = w_gate_up.view(e, 2, two_i // 2, h)  # [E, gate|up, I, H]
    sms = _num_sms(a.device)
    _gate_up_gemm[(sms,)](
        TensorDescriptor.from_tensor(a, [bm, bk]), TensorDescriptor.from_tensor(w_gate_up.view(e * two_i, h), [bn, bk]),
        TensorDescriptor(w2, list(w2.shape), list(w2.stride()), [1, 2, bn, bk]),
        TensorDescriptor.from_tensor(act, [bm, bn]), al.block_expert, al.rows_used, two_i // 2, h,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg["GROUP_M"], NUM_SMS=sms, FLATTEN=cfg.get("FLATTEN", True),
        FUSED_GU=cfg.get("FUSED_GU", True), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **_pdl(cfg))


def launch_down(act: torch.Tensor, w_down: torch.Tensor, y: torch.Tensor, out: torch.Tensor, weights: torch.Tensor,
                al: Alignment, top_k: int, cfg: dict, atomic: bool) -> None:
    """y [EM, H] bf16 = weights[pair] * (act @ down^T) per row in use, or (atomic) those rows added into out [T, H]
    (float32, zeroed) at row pair // top_k; weights [P] float32."""
    e, h, inter = w_down.shape
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    split = cfg.get("EPI_SPLIT", False) and not atomic  # y stored as two [BM, BN / 2] halves (no y with atomics)
    sms = _num_sms(act.device)
    _down_gemm[(sms,)](
        TensorDescriptor.from_tensor(act, [bm, bk]), TensorDescriptor.from_tensor(w_down.view(e * h, inter), [bn, bk]),
        TensorDescriptor.from_tensor(y, [bm, bn // 2 if split else bn]), out, al.sorted_ids, weights,
        al.block_expert, al.rows_used, al.num_pairs, h, inter, TOP_K=top_k, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        GROUP_M=cfg["GROUP_M"], NUM_SMS=sms, FLATTEN=cfg.get("FLATTEN", True), ATOMIC=atomic, EPI_SPLIT=split,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **_pdl(cfg))


def _pdl(cfg: dict) -> dict:
    """cfg["PDL"]: launched as a programmatic dependent of the kernel before (pdl.py), so its launch and ramp overlap
    that kernel's last wave; off on the CPU / interpreter / before sm_90 (pdl.ON)."""
    return {"PDL": True, "launch_pdl": True} if cfg.get("PDL", False) and pdl.ON else {"PDL": False}
