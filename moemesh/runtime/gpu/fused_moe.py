"""Fused MoE on the GPU (Triton), no host synchronisation: the routed experts of one layer in two grouped GEMMs.

    hidden [T, H], local ids [T, K], weights [T, K]
      -> align (moe_align.py): pair ids sorted by expert, padded per expert to BLOCK_M rows
      -> kernel 1, GATED: act[p] = silu(hidden[p // K] @ gate_e^T) * (hidden[p // K] @ up_e^T)     # [P, I]
      -> kernel 2, WEIGHTED: y[p] = weight[p] * (act[p] @ down_e^T)                              # [P, H] fp32
      -> slot_sum: out[t] = sum over hosted k of y[t*K + k], one kernel                           # [T, H] fp32

Quantized experts at decode sizes (fp8 from 5 to 256 tokens on the H200; int8 to 24, int4 from 17 to 64) run
both kernels with their operands swapped instead (moe_swap.py: the weights the tensor cores' register operand).
Each program computes one BLOCK_M x BLOCK_N tile of one expert's rows, so an expert's weights are read once per
row block: at decode sizes the kernels stream each selected expert's weights once (memory bound). Block shapes come
from configs/*.json, tuned per token count on the target GPU (benchmarks/moe_kernel.py writes them), as vLLM does.
Pairs of experts not hosted here are never computed; their rows of y stay unwritten and slot_sum masks them.

Weights are bf16/fp16 tensors or quant.QuantTensor stacks (int8 / fp8 e4m3 + float32 scales, or int4 two per byte +
a float32 scale per 128 (or 32, 64) columns, optionally zero points), dequantized inside the kernels (moe_kernels.py,
int4_kernels.py). Quantized weights use their own
tuned configs when present (`dtype=int4` etc. in the file name), else the bf16 ones (same shape; the tiles then move
half or a quarter of the bytes). int4 steps K one 128-column packing block at a time in the GEMM (BLOCK_K is then
ignored) and a multiple of 128 columns in the GEMV.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch
import triton

from moemesh.runtime.gpu import int4_prefill, int4_q8, moe_swap, pdl, prefill_fp8, prefill_moe, prefill_permute
from moemesh.runtime.gpu.moe_align import SMALL_PAIRS, Alignment, align, align_small
from moemesh.runtime.gpu.moe_kernels import _moe_gemm, _moe_gemv
from moemesh.runtime.quant import INT4_BLOCK, QuantTensor

CONFIG_DIR = Path(__file__).parent / "configs"
CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")
GEMV_MAX_PAIRS = 32  # up to this many (token, slot) pairs the GEMV kernel runs (experts are then mostly distinct)
# UNROLL: the K loop unrolled at compile time (K as a constexpr), so a program issues every K step's loads before
# the first step's math; measured on the H200 at T=1 (benchmarks/h200/gemv_sweep.py): 5-10% faster per kernel.
# WORDS (symmetric int4, groups of 128): packed weights read as 32-bit words, each step's gate and up words loaded
# before either's math, nibbles decoded without int-to-float conversions (int4_kernels._int4_words); T=1 on the H200:
# gate_up 12.7 -> 11.0 us, down 8.8 -> 8.5 us. DP4A (int4_dp4a.py, the H200 table's choice since 2026-11-29): the same
# words on integer dot products, activations rounded to int8 per 32 columns: gate_up 9.4 -> 7.8 us, down 7.1 -> 5.8.
GEMV_DEFAULT = {"gemv_gate_up": {"BLOCK_N": 16, "BLOCK_K": 256, "num_warps": 4, "num_stages": 3, "UNROLL": True},
                "gemv_down": {"BLOCK_N": 32, "BLOCK_K": 256, "num_warps": 4, "num_stages": 3, "UNROLL": True}}
# int4 rows hold a quarter of bf16's bytes: wider K steps keep 16-byte loads per thread (bf16's GEMV table does not
# apply; checked on the sm_90 PTX: BLOCK_N 8 x BLOCK_K 512 -> ld.global.v4). Used until benchmarks/moe_kernel.py
# --tune-gemv --tune-for int4 writes the int4 table.
GEMV_INT4_DEFAULT = {"gemv_gate_up": {"BLOCK_N": 8, "BLOCK_K": 1024, "num_warps": 4, "num_stages": 3, "UNROLL": True},
                     "gemv_down": {"BLOCK_N": 8, "BLOCK_K": 512, "num_warps": 4, "num_stages": 3, "UNROLL": True}}
Weight = torch.Tensor | QuantTensor
# DP4A in an int4 GEMV config (symmetric groups of 128): integer dot products with the activations rounded to int8,
# one step per DP4A (128 or 32) columns (int4_dp4a.py). MOEMESH_INT4_DP4A=0 keeps float activations everywhere.
DP4A_ON = os.environ.get("MOEMESH_INT4_DP4A", "1") != "0"
# Q8 (int4 table, kinds q8_gate_up / q8_down; int4_q8.py): the activations rounded once per row instead of in every
# GEMV program; H200, one token, both GEMVs in a graph: 14.46 -> 12.98 us per layer (benchmarks/h200/int4_q8.py).
# MOEMESH_INT4_Q8=0 (or MOEMESH_INT4_DP4A=0) keeps the dp4a GEMVs.
Q8_ON = DP4A_ON and os.environ.get("MOEMESH_INT4_Q8", "1") != "0"


def _weight_args(w: Weight, block_k: int) -> tuple[tuple, dict, int]:
    """(data, scale, zero, stride_se, stride_sn), the QUANT/GROUP_K/INT4/ZP constexprs and the BLOCK_K to use for
    weight w (zero: int4 zero points laid out as the scales, else any tensor, unread)."""
    if not isinstance(w, QuantTensor):
        return (w, w, w, 0, 0), {"QUANT": False, "GROUP_K": 0, "INT4": False, "ZP": False}, block_k
    scale = w.scale  # [E, N, G] contiguous
    if w.scheme == "int4":  # K steps of whole 128-column packing blocks
        zero = w.zero if w.zero is not None else scale  # [E, N, G]
        flags = {"QUANT": True, "GROUP_K": w.block_k, "INT4": True, "ZP": w.zero is not None}
        return (w.q, scale, zero, scale.stride(0), scale.stride(1)), flags, max(INT4_BLOCK, block_k // INT4_BLOCK *
                                                                               INT4_BLOCK)
    group = 0 if w.per_channel else w.block_k
    if group:  # a K step must not straddle two scale groups
        block_k = min(block_k, group)
        if group % block_k:
            raise ValueError(f"scale block of {group} columns is not a multiple of BLOCK_K {block_k}")
    return (w.q, scale, scale, scale.stride(0), scale.stride(1)), {"QUANT": True, "GROUP_K": group, "INT4": False,
                                                                    "ZP": False}, block_k


def moe_gemv(a: torch.Tensor, w: Weight, out: torch.Tensor, ids: torch.Tensor, a_div: int, cfg: dict,
             weights: torch.Tensor | None = None, up_rows: int = 0, sum_slots: int = 0,
             zero: torch.Tensor | None = None) -> torch.Tensor:
    """One launch of _moe_gemv: out [P, n_out] fully written (zeros for pairs hosted elsewhere); sum_slots K > 0:
    out [P / K, n_out] float32 zeroed beforehand, each token's K rows added into it. zero (float32, contiguous, not
    with weights): zeroed by this launch too (the next launch's accumulator)."""
    n_out, k_in = out.shape[1], a.shape[1]
    (data, scale, zero_points, sse, ssn), quant, block_k = _weight_args(w, cfg["BLOCK_K"])
    grid = (ids.numel(), triton.cdiv(n_out, cfg["BLOCK_N"]))
    zero_n = zero.numel() if zero is not None else 0
    if zero_n > grid[0] * grid[1] * 256 or (zero is not None and weights is not None):
        raise ValueError(f"cannot zero {zero_n} values with {grid} programs (or with weights)")
    _moe_gemv[grid](
        a, data, out, weights if weights is not None else zero if zero is not None else out, ids, scale,
        zero_points, n_out, k_in, a.stride(0), data.stride(0), data.stride(1), out.stride(0), sse, ssn, up_rows,
        A_DIV=a_div, GATED=up_rows > 0, WEIGHTED=weights is not None, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=block_k,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], SUM_SLOTS=sum_slots, ZERO_N=zero_n,
        K_STATIC=k_in if cfg.get("UNROLL") or cfg.get("WORDS") else 0, WORDS=_words(cfg), **quant, **pdl.launch())
    return out


def _words(cfg: dict) -> int:
    """_moe_gemv's WORDS: 0 off, 1 the int4 word decode in plain Triton (the interpreter), 2 with inline lop3; DP4A
    (int4_dp4a.py): 3 / 4 with an activation step per 128 columns (plain Triton / inline dp4a), 5 / 6 per 32."""
    if not cfg.get("WORDS"):
        return 0
    dp4a = cfg.get("DP4A") if DP4A_ON else None  # 128 (or True) / 32: columns per activation step
    return (1 if not dp4a else 5 if dp4a == 32 else 3) + (os.environ.get("TRITON_INTERPRET") != "1")


def default_config(tokens: int, kind: str) -> dict[str, int]:
    """Untuned fallback: small row blocks when experts get few rows (decode), larger tiles for prefill."""
    if tokens <= 64:
        return {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 1, "num_warps": 4, "num_stages": 4}
    if tokens <= 512:
        return {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 4, "num_stages": 3}
    return {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8 if kind == "down" else 4,
            "num_stages": 3}


def config_name(num_experts: int, inter: int, hidden: int, dtype: torch.dtype | str, device_name: str) -> str:
    """dtype: the weights' torch dtype, or "int4" (stored as uint8)."""
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


def _own_table(w: QuantTensor) -> dict[int, dict]:
    """The tuned table of a quantized gate_up stack's own dtype (int4, or its storage dtype) on its device ("cpu":
    Triton's interpreter), without pick_config's fallback to bf16's."""
    e, two_i, h = w.shape
    device = _device_name(w.q.device.index or 0) if w.q.is_cuda else "cpu"
    return _tuned(config_name(e, two_i // 2, h, "int4" if w.scheme == "int4" else w.q.dtype, device))


def pick_config(tokens: int, kind: str, w_gate_up: Weight) -> dict[str, int]:
    """Tuned config of the nearest token count for this shape, weight dtype and GPU (quantized weights fall back
    to the bf16 table of the shape, kind by kind, except int4's GEMV), else default_config / the GEMV defaults."""
    e, two_i, h = w_gate_up.shape
    data = w_gate_up.q if isinstance(w_gate_up, QuantTensor) else w_gate_up
    device = _device_name(data.device.index or 0) if data.is_cuda else "cpu"  # cpu: Triton's interpreter
    int4 = isinstance(w_gate_up, QuantTensor) and w_gate_up.scheme == "int4"
    dtype = "int4" if int4 else data.dtype
    gemv = kind.startswith("gemv")
    dtypes = (dtype, torch.bfloat16) if isinstance(w_gate_up, QuantTensor) and not (int4 and gemv) else (dtype,)
    for name in (config_name(e, two_i // 2, h, d, device) for d in dtypes):
        table = {m: entry[kind] for m, entry in _tuned(name).items() if kind in entry}
        if table and gemv:
            return table[min(table)]
        if table:
            return table[min(table, key=lambda m: abs(m - tokens))]
    if gemv:
        return (GEMV_INT4_DEFAULT if int4 else GEMV_DEFAULT)[kind]
    return default_config(tokens, kind)


def moe_gemm(a: torch.Tensor, w: Weight, out: torch.Tensor, al: Alignment, a_div: int, cfg: dict,
             weights: torch.Tensor | None = None, up_rows: int = 0) -> torch.Tensor:
    """One launch of _moe_gemm; out [P, n_out] (rows of pairs not computed are left as they were)."""
    n_out, k_in = out.shape[1], a.shape[1]
    em = al.sorted_ids.numel()
    (data, scale, zero, sse, ssn), quant, block_k = _weight_args(w, cfg["BLOCK_K"])
    grid = (triton.cdiv(em, cfg["BLOCK_M"]) * triton.cdiv(n_out, cfg["BLOCK_N"]),)
    _moe_gemm[grid](
        a, data, out, weights if weights is not None else out, al.sorted_ids, al.block_expert, al.rows_used, scale,
        zero, al.num_pairs, em, n_out, k_in, a.stride(0), data.stride(0), data.stride(1), out.stride(0), sse, ssn,
        up_rows, A_DIV=a_div, GATED=up_rows > 0, WEIGHTED=weights is not None, EVEN_K=k_in % block_k == 0,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=block_k, GROUP_M=cfg["GROUP_M"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], MAGIC=quant["INT4"] and cfg.get("MAGIC", False),
        I8=_i8(cfg, quant), **quant, **pdl.launch(),
    )
    return out


def _i8(cfg: dict, quant: dict) -> int:
    """_moe_gemm's I8 (int4 on int8 tensor cores where the tuned config says so; int4_dp4a.py): 0 off, 1 in plain
    Triton (the interpreter), 2 with inline PTX."""
    if not (cfg.get("I8") and quant["INT4"] and DP4A_ON):
        return 0
    return 1 if os.environ.get("TRITON_INTERPRET") == "1" else 2


def fused_moe(hidden: torch.Tensor, w_gate_up: Weight, w_down: Weight, local_ids: torch.Tensor,
              topk_weights: torch.Tensor, configs: tuple[dict, dict] | None = None) -> torch.Tensor:
    """hidden [T, H] (the compute dtype), w_gate_up [E, 2I, H], w_down [E, H, I] (tensors in hidden's dtype or
    QuantTensors), local_ids [T, K] (-1: not hosted), topk_weights [T, K] -> [T, H] float32 = sum_k weight *
    SwiGLU expert. configs: (gate_up, down) overrides."""
    t, k = local_ids.shape
    inter = w_down.shape[2]
    if configs is None and t * k <= gemv_max_pairs(w_gate_up):
        return _fused_moe_gemv(hidden, w_gate_up, w_down, local_ids, topk_weights)
    if configs is None and prefill_moe.wanted(hidden, w_gate_up, w_down):  # large bf16 steps on Hopper: TMA + wgmma
        return prefill_moe.prefill_moe(hidden, w_gate_up, w_down, local_ids, topk_weights)
    if configs is None and prefill_fp8.wanted(hidden, w_gate_up, w_down):  # large fp8 steps: e4m3 x e4m3 wgmma
        return prefill_fp8.prefill_fp8(hidden, w_gate_up, w_down, local_ids, topk_weights)
    if configs is None and (int4_prefill.fp8_wanted(hidden, w_gate_up, w_down)  # large int4 steps: e4m3 codes
                            or int4_prefill.wanted(hidden, w_gate_up, w_down)):  # or dequantized to bf16, TMA
        return int4_prefill.int4_prefill(hidden, w_gate_up, w_down, local_ids, topk_weights)
    swap = configs is None and swap_configs(t, w_gate_up)  # quantized experts at decode sizes: moe_swap.py
    cfg_up, cfg_down = swap or configs or (pick_config(t, "gate_up", w_gate_up), pick_config(t, "down", w_gate_up))
    gemm = moe_swap.moe_gemm_swap if swap else moe_gemm
    hidden = hidden.contiguous()
    weights = topk_weights.reshape(-1).float().contiguous()  # [P]
    aligner = align_small if t * k <= SMALL_PAIRS else align  # one launch for decode sizes
    al_up = aligner(local_ids, w_gate_up.shape[0], cfg_up["BLOCK_M"])
    act = torch.empty(t * k, inter, dtype=hidden.dtype, device=hidden.device)  # [P, I]
    gemm(hidden, w_gate_up, act, al_up, k, cfg_up, up_rows=inter)
    al_down = al_up if cfg_down["BLOCK_M"] == cfg_up["BLOCK_M"] else aligner(local_ids, w_down.shape[0],
                                                                              cfg_down["BLOCK_M"])
    y = torch.empty(t * k, hidden.shape[1], dtype=torch.float32, device=hidden.device)  # [P, H]
    gemm(act, w_down, y, al_down, 1, cfg_down, weights=weights)
    return slot_sum(y, local_ids)


def slot_sum(y: torch.Tensor, local_ids: torch.Tensor) -> torch.Tensor:
    """y [P, H] float32 (rows of slots hosted elsewhere unwritten) -> [T, H] float32, each token's hosted slots
    summed: one launch, where a zero fill of y and torch's sum took two (H200, Qwen3-30B-A3B shape at 64 tokens,
    ncu: 5.4 us per layer against 2.9 + 6.7; graph replay of the 48-layer step at batch 8 / 64 / 128, fp8 5.78 /
    11.11 / 12.56 -> 5.59 / 10.89 / 12.26 ms, bf16 8.33 / 17.01 / 18.09 -> 8.24 / 16.80 / 17.73)."""
    out = torch.empty(local_ids.shape[0], y.shape[1], dtype=torch.float32, device=y.device)
    return prefill_permute.gather_sum(y, None, local_ids, out)


def swap_configs(tokens: int, w_gate_up: Weight) -> tuple[dict, dict] | None:
    """(gate_up, down) configs of moe_swap for a step of `tokens` tokens, from the weights' own tuned table (not
    bf16's), or None where fused_moe's GEMM runs it. (The GEMV, where gemv_max_pairs takes the step, comes first.)"""
    if not moe_swap.usable(w_gate_up):
        return None
    tuned = _own_table(w_gate_up)
    up, down = (moe_swap.config(tokens, tuned, kind, w_gate_up.scheme) for kind in ("swap_gate_up", "swap_down"))
    return (up, down) if up and down else None


def q8_configs(w_gate_up: Weight) -> tuple[dict, dict] | None:
    """(gate_up, down) configs of int4_q8's GEMVs where this GPU's int4 table has them (kinds q8_gate_up, q8_down of
    its first entry) and weights they read, else None: untuned GPUs and other int4 keep the dp4a / word GEMVs
    (and their own MAX_PAIRS)."""
    if not (Q8_ON and int4_q8.plain(w_gate_up)):
        return None
    table = _own_table(w_gate_up)
    entry = table[min(table)] if table else {}
    return (entry["q8_gate_up"], entry["q8_down"]) if "q8_gate_up" in entry and "q8_down" in entry else None


def gemv_max_pairs(w_gate_up: Weight) -> int:
    """Up to how many (token, slot) pairs fused_moe runs the GEMV: GEMV_MAX_PAIRS, or the tuned GEMV's MAX_PAIRS
    where it is on dp4a (int4, the H200: one MoE layer at 8 tokens 53 us against 122 with the float GEMM, at 16
    tokens 98 against 121 with the GEMM on int8 tensor cores, at 24 141 against 144; benchmarks/h200/int4_i8_sweep.py).
    Beyond (32 tokens on), the I8 GEMM: 151-172 us from 32 to 128 tokens. (Measured on the H200 and dropped,
    2026-11-29: each expert's weights decoded once for all its pairs
    (sorted by moe_align, 8-row blocks), dp4a per row with each row's activations rounded per program: 642 us at 64
    tokens, 1,346 at 128, against the GEMM's 233 / 239; the per-row activation rounding and selects dominate.)"""
    if not isinstance(w_gate_up, QuantTensor) or w_gate_up.scheme != "int4" or not DP4A_ON:
        return GEMV_MAX_PAIRS
    q8 = q8_configs(w_gate_up)  # their own reach (H200: 20 tokens, 105 us against the swapped GEMM's 106)
    if q8 is not None and "MAX_PAIRS" in q8[0]:
        return q8[0]["MAX_PAIRS"]
    cfg = pick_config(1, "gemv_gate_up", w_gate_up)
    return cfg.get("MAX_PAIRS", GEMV_MAX_PAIRS) if cfg.get("DP4A") else GEMV_MAX_PAIRS


# Measured and dropped (2026-11-30, branch one-launch-int4): int4's two GEMVs in one launch, down's programs loading
# their weights first and waiting on per-pair counters for gate_up's rows. Correct, slower on the H200 (48-layer graph
# replay, batch 1 2.01 vs 1.94 ms, batch 4 3.58 vs 3.13): the waiting programs hold SM slots while gate_up runs.
# Also dropped (2026-11-30, branch int4-slice-moe, benchmarks/results/int4-slice-h200.json): one launch with no waiting,
# each program a slice of C rows of one expert's intermediate (its gate and up rows, then the same rows of a down^T
# copy made at load, added into the token's row with float32 atomics). Exact (2.9e-4 against torch, the dp4a GEMVs
# 1.2e-2), but 30.1-50 us per layer at one token against the two GEMVs' 14.5 in a graph: Triton 3.6 gives it ~250
# registers a thread, one program per SM, three waves of ~15 us. Again 2026-12-01 (branch int4-slice-dp4a,
# benchmarks/results/int4-slice-dp4a-h200.json): both dots on dp4a over q8 activations, down read in its own layout
# (BB bytes of each row = 2 BB intermediate columns, no copy), quantize_rows zeroing the output: exact against its
# rounding (4e-7), best of 14 tiles 16.5 us per layer at one token against the q8 GEMVs' 12.8 (2 tokens 27.5 vs
# 19.1, 4 tokens 42.3 vs 28.7); without its atomics 17.1 (not the cost); 151-255 registers a thread. The ALU work
# (~2.3 instructions a weight, ~3 us a layer spread over every SM) no longer overlaps a second kernel's loads.
def _fused_moe_gemv(hidden: torch.Tensor, w_gate_up: Weight, w_down: Weight, local_ids: torch.Tensor,
                    topk_weights: torch.Tensor) -> torch.Tensor:
    """fused_moe for a few tokens: two GEMV launches, the second adding each slot into its token's row (the first
    also zeroes the rows the second adds into)."""
    t, k = local_ids.shape
    inter = w_down.shape[2]
    ids = local_ids.reshape(-1).long().contiguous()  # [P]
    hidden = hidden.contiguous()
    q8 = q8_configs(w_gate_up)
    if q8 is not None and int4_q8.usable(hidden, w_gate_up, w_down, q8[0]):
        return int4_q8.moe_q8(hidden, w_gate_up, w_down, ids, topk_weights.reshape(-1).float().contiguous(), *q8)
    act = torch.empty(t * k, inter, dtype=hidden.dtype, device=hidden.device)  # [P, I]
    out = torch.empty(t, hidden.shape[1], dtype=torch.float32, device=hidden.device)  # [T, H], zeroed by gate_up
    moe_gemv(hidden, w_gate_up, act, ids, k, pick_config(t, "gemv_gate_up", w_gate_up), up_rows=inter, zero=out)
    weights = topk_weights.reshape(-1).float().contiguous()
    return moe_gemv(act, w_down, out, ids, 1, pick_config(t, "gemv_down", w_gate_up), weights=weights, sum_slots=k)
