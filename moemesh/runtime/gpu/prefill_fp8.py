"""Prefill-sized MoE steps with fp8 experts on fp8 tensor cores (W8A8, Hopper): prefill_moe's TMA + wgmma
persistent GEMMs with e4m3 activations as well as e4m3 weights, at twice bf16's tensor-core rate and half its bytes.

Without this, fp8 experts prefill through fused_moe's row-block GEMM, each weight tile widened to bf16 in the inner
loop (W8A16): slower than bf16 experts through prefill_moe, so choosing fp8 for cost made long prompts slower. H200,
one Qwen3-30B-A3B layer at 4,096 tokens (benchmarks/results/prefill-fp8-h200.md): 478-497 us here, 1,560-1,592 before,
bf16 experts 727-730; a 4,096-token prompt's first token 132 -> 87 ms (48 layers).

    hidden [T, H] --_quantize_tokens--> hq [T, H] e4m3, s_tok [T]       # per token: absmax / 448
      -> permute_fused(hq): A [EM, H] e4m3 rows grouped by expert (prefill_permute.py, half the bf16 bytes)
      -> _gate_up_fp8: g, u = (A @ gate^T, A @ up^T) * s_tok[row] * s_w[col]             # [BM, BN] float32
                       act = silu(g) * u; per row of the tile: s_act = absmax / 448       # [EM, I / BN]
                       act_q = e4m3(act / s_act)                                          # [EM, I]
      -> _down_fp8:    y[r] = weight[p] * s_w[col] * sum_k s_act[r, k] (act_q[r, k] @ down_k^T)   # [EM, H] bf16
                       (k: one step of BLOCK_K = BN columns, whose scale the accumulator is kept in)
      -> gather_sum:   out[t] = sum_k y[inv[t*K + k]]                                     # [T, H] float32

Scales: weights one per output channel (experts.py quantizes routed experts so); tokens one per row (the gate_up
input); act one per row and gate_up tile, so the down GEMM rescales its float32 accumulator at each K step
(acc = acc * s_prev / s_cur, then the dot into it; the same multiply count as a second accumulator, half the
registers). Weights scaled per BLOCK_K columns of a row (DeepSeek's FP8 checkpoints as from_block_fp8 reads them,
int4 codes from int4_prefill.as_fp8) are rescaled the same way per column (W_GROUPS); other blocks keep fused_moe.
Error: each activation keeps e4m3's 3 mantissa bits, as each weight does: the layer is 6.4% from bf16 weights (W8A16:
4.6%), as its float32 torch reference is, so fp8 wgmma's narrower accumulator adds nothing visible (PROMOTE: 6.35%,
40% slower). SmolLM2-MoE perplexity with these numerics emulated on the CPU: +0.88% on wikitext-2 (W8A16 +0.37%),
+6.27% on held-out us-founding (+4.11%) (benchmarks/results/quant-quality-fp8-w8a8-smollm2-moe.md). Decode stays
weight-only. MOEMESH_PREFILL_FP8=0 turns the path off.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from moemesh.runtime.gpu.pdl import enter
from moemesh.runtime.gpu.prefill_moe import PREFILL_MIN_TOKENS, _num_sms, _tile, tile_problem
from moemesh.runtime.gpu.prefill_permute import gather_sum, permute_fused
from moemesh.runtime.quant import QuantTensor

ENABLED = os.environ.get("MOEMESH_PREFILL_FP8", "1") == "1"
FP8_MAX = 448.0  # largest finite e4m3
# H200 starting points (benchmarks/h200/prefill_fp8.py sweeps around them). BLOCK_K 128 e4m3 = 128 bytes a row, the
# same shared-memory tile as bf16's 64. gate_up's BLOCK_N is also the act scale group and down's BLOCK_K.
DEFAULT_GATE_UP = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}
DEFAULT_DOWN = {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}


@triton.jit
def _quantize_tokens(h_ptr, q_ptr, s_ptr, hidden, BLOCK_H: tl.constexpr):
    """One token per program: s = absmax / 448 over its row (1 for an all-zero row), q = e4m3(h / s)."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    x = tl.load(h_ptr + t * hidden + cols, mask=cols < hidden, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), 0)
    step = tl.where(amax > 0, amax / 448.0, 1.0)
    q = (x / step).to(q_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
    tl.store(q_ptr + t * hidden + cols, q, mask=cols < hidden)
    tl.store(s_ptr + t, step)


@triton.jit
def _gate_up_fp8(a_desc, w2_desc, act_desc, act_scale_ptr, tok_scale_ptr, w_scale_ptr, sorted_ptr, expert_ptr,
                 rows_used_ptr, num_pairs, inter, k_in, TOP_K: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr,
                 W_GROUPS: tl.constexpr = 0, PROMOTE: tl.constexpr = False, PDL: tl.constexpr = False):
    """act_q, s_act per [BM, BN] tile (module doc). w2_desc: gate_up e4m3 as [E, 2, I, H], block [1, 2, BN, BK]
    (gate and up tiles in one copy, one [BM, 2 BN] wgmma); w_scale [E, 2I, max(W_GROUPS, 1)]: one per channel
    (W_GROUPS 0) or per BLOCK_K columns (W_GROUPS = H / BLOCK_K: each step's columns rescaled as act's are in
    _down_fp8); act_scale [EM, I / BN]. PROMOTE: each K step's product summed into the float32 accumulator outside
    the tensor cores (DeepSeek-V3's remedy for fp8 wgmma's narrower accumulator; twice the accumulator registers)."""
    enter(PDL)
    num_m = (tl.load(rows_used_ptr) // BLOCK_M).to(tl.int32)
    num_n = inter // BLOCK_N
    j2 = tl.arange(0, 2 * BLOCK_N)
    for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_SMS, flatten=True):
        row0, n0, expert = _tile(tile, num_m, num_n, expert_ptr, BLOCK_M, BLOCK_N, GROUP_M)
        wrow = expert.to(tl.int64) * 2 * inter + n0 + j2 + tl.where(j2 < BLOCK_N, 0, inter - BLOCK_N)  # [2BN]
        acc = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32)
        prev_w = tl.full((2 * BLOCK_N,), 1.0, tl.float32)
        for k0 in range(0, k_in, BLOCK_K):
            a = a_desc.load([row0, k0])  # [BM, BK] e4m3
            w = w2_desc.load([expert, 0, n0, k0]).reshape(2 * BLOCK_N, BLOCK_K)  # [gate; up] rows, e4m3
            if W_GROUPS > 0:
                s_w = tl.load(w_scale_ptr + wrow * W_GROUPS + k0 // BLOCK_K)  # [2BN]
                if PROMOTE:
                    acc += tl.dot(a, w.T) * s_w[None, :]
                else:
                    acc = tl.dot(a, w.T, acc * (prev_w / s_w)[None, :])
                    prev_w = s_w
            elif PROMOTE:
                acc += tl.dot(a, w.T)
            else:
                acc = tl.dot(a, w.T, acc)
        if W_GROUPS == 0:
            acc = acc * tl.load(w_scale_ptr + wrow)[None, :]
        else:
            acc = acc * prev_w[None, :]  # all ones with PROMOTE
        rows = row0 + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_ptr + rows)  # [BM] int64; num_pairs on padding rows
        s_tok = tl.load(tok_scale_ptr + pair // TOP_K, mask=pair < num_pairs, other=0.0)  # 0: padding rows -> 0
        gate, up = (acc * s_tok[:, None]).reshape(BLOCK_M, 2, BLOCK_N).permute(0, 2, 1).split()  # [BM, BN] each
        act = gate / (1.0 + tl.exp(-gate)) * up  # [BM, BN] float32
        amax = tl.max(tl.abs(act), 1)
        step = tl.where(amax > 0, amax / 448.0, 1.0)  # [BM]
        act_desc.store([row0, n0], (act / step[:, None]).to(act_desc.dtype, fp_downcast_rounding="rtne"))
        tl.store(act_scale_ptr + rows * num_n + n0 // BLOCK_N, step)


@triton.jit
def _down_fp8(act_desc, w_desc, y_desc, act_scale_ptr, w_scale_ptr, sorted_ptr, weight_ptr, expert_ptr,
              rows_used_ptr, num_pairs, hidden, k_in, ACT_GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr,
              W_GROUPS: tl.constexpr = 0, PROMOTE: tl.constexpr = False, PDL: tl.constexpr = False):
    """y = weight[pair] * sum_k s_act[:, k] s_w[:, k] (act_q_k @ down_k^T) per [BM, BN] tile; w_desc: down e4m3 as
    [E * H, I] rows, block [BN, BK]; w_scale [E, H, max(W_GROUPS, 1)] as _gate_up_fp8's. BLOCK_K divides ACT_GROUP
    (one act scale a step). PROMOTE: each step's product scaled into a second accumulator instead of rescaling the
    one the dot adds to (by the rank-1 ratio of this step's scales to the last's)."""
    enter(PDL)
    num_m = (tl.load(rows_used_ptr) // BLOCK_M).to(tl.int32)
    num_n = hidden // BLOCK_N
    groups = k_in // ACT_GROUP
    for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_SMS, flatten=True):
        row0, n0, expert = _tile(tile, num_m, num_n, expert_ptr, BLOCK_M, BLOCK_N, GROUP_M)
        rows = row0 + tl.arange(0, BLOCK_M)
        wrow = expert.to(tl.int64) * hidden + n0 + tl.arange(0, BLOCK_N)  # [BN]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # in units of the last step's scales
        prev = tl.full((BLOCK_M,), 1.0, tl.float32)
        prev_w = tl.full((BLOCK_N,), 1.0, tl.float32)
        for k0 in range(0, k_in, BLOCK_K):
            s = tl.load(act_scale_ptr + rows * groups + k0 // ACT_GROUP)  # [BM]
            a, w = act_desc.load([row0, k0]), w_desc.load([expert * hidden + n0, k0])
            if W_GROUPS > 0:
                s_w = tl.load(w_scale_ptr + wrow * W_GROUPS + k0 // BLOCK_K)  # [BN]
                if PROMOTE:
                    acc += tl.dot(a, w.T) * s[:, None] * s_w[None, :]
                else:
                    acc = tl.dot(a, w.T, acc * (prev / s)[:, None] * (prev_w / s_w)[None, :])
                    prev, prev_w = s, s_w
            elif PROMOTE:
                acc += tl.dot(a, w.T) * s[:, None]
            else:
                acc = tl.dot(a, w.T, acc * (prev / s)[:, None])
                prev = s
        pair = tl.load(sorted_ptr + rows)  # [BM] int64; num_pairs on padding rows
        row_scale = prev * tl.load(weight_ptr + pair, mask=pair < num_pairs, other=0.0)  # [BM]
        col_scale = tl.load(w_scale_ptr + wrow) if W_GROUPS == 0 else prev_w  # [BN]; ones with PROMOTE
        y_desc.store([row0, n0], (acc * row_scale[:, None] * col_scale[None, :]).to(y_desc.dtype))


def usable(hidden: torch.Tensor, w_gate_up, w_down, cfg_up: dict = DEFAULT_GATE_UP,
           cfg_down: dict = DEFAULT_DOWN) -> str:
    """'' when prefill_fp8 can run these operands with these configs, else why not."""
    for name, w in (("w_gate_up", w_gate_up), ("w_down", w_down)):
        if not isinstance(w, QuantTensor) or w.scheme != "fp8":
            return f"{name} is not an fp8 QuantTensor"
        block_k = (cfg_up if name == "w_gate_up" else cfg_down)["BLOCK_K"]
        if not w.per_channel and (w.block_k != block_k or w.scale.shape[-1] * block_k != w.shape[-1]):
            return f"{name} has {w.block_k}-column scale blocks (prefill_fp8 takes one scale per channel or per " \
                   f"{block_k} columns)"
        if not (w.q.is_contiguous() and w.scale.is_contiguous()):
            return f"{name} is not contiguous (the TMA descriptors view it as 2D rows)"
    if hidden.dtype not in (torch.bfloat16, torch.float16):
        return f"hidden dtype {hidden.dtype} (bf16 or fp16)"
    if why := tile_problem(w_down, cfg_up, cfg_down):
        return why
    if cfg_up["BLOCK_N"] % cfg_down["BLOCK_K"]:
        return f"down's BLOCK_K {cfg_down['BLOCK_K']} does not divide gate_up's BLOCK_N {cfg_up['BLOCK_N']}"
    return ""


def wanted(hidden: torch.Tensor, w_gate_up, w_down) -> bool:
    """Whether fused_moe should hand this call to prefill_fp8: enabled, enough tokens, Hopper or newer (TMA and fp8
    wgmma), and operands prefill_fp8 takes."""
    if not ENABLED or hidden.shape[0] < PREFILL_MIN_TOKENS or not hidden.is_cuda:
        return False
    return torch.cuda.get_device_capability(hidden.device)[0] >= 9 and usable(hidden, w_gate_up, w_down) == ""


def quantize_tokens(hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [T, H] -> (e4m3 [T, H], float32 scale [T]): one scale per token, absmax / 448."""
    t, h = hidden.shape
    q = torch.empty(t, h, dtype=torch.float8_e4m3fn, device=hidden.device)
    s = torch.empty(t, dtype=torch.float32, device=hidden.device)
    if t:
        _quantize_tokens[(t,)](hidden.contiguous(), q, s, h, BLOCK_H=triton.next_power_of_2(h), num_warps=4)
    return q, s


def prefill_fp8(hidden: torch.Tensor, w_gate_up: QuantTensor, w_down: QuantTensor, local_ids: torch.Tensor,
                topk_weights: torch.Tensor, configs: tuple[dict, dict] | None = None) -> torch.Tensor:
    """fused_moe's contract for fp8 per-channel experts: hidden [T, H], w_gate_up [E, 2I, H], w_down [E, H, I],
    local_ids [T, K] (-1: not hosted), topk_weights [T, K] -> [T, H] float32. Raises ValueError when `usable`
    says no."""
    cfg_up, cfg_down = configs or (DEFAULT_GATE_UP, DEFAULT_DOWN)
    reason = usable(hidden, w_gate_up, w_down, cfg_up, cfg_down)
    if reason:
        raise ValueError(f"prefill_fp8: {reason}")
    t, k = local_ids.shape
    e, two_i, h = w_gate_up.shape
    inter, bm, dev = two_i // 2, cfg_up["BLOCK_M"], hidden.device
    hq, s_tok = quantize_tokens(hidden)
    al, a, inv = permute_fused(hq, local_ids, e, bm)
    em = al.sorted_ids.numel()
    act = torch.empty(em, inter, dtype=torch.float8_e4m3fn, device=dev)  # [EM, I]
    act_scale = torch.empty(em, inter // cfg_up["BLOCK_N"], dtype=torch.float32, device=dev)  # [EM, I / BN]
    weights = topk_weights.reshape(-1).float().contiguous()  # [P]
    y = torch.empty(em, h, dtype=hidden.dtype, device=dev)  # [EM, H]
    out = torch.empty(t, h, dtype=torch.float32, device=dev)  # [T, H]
    launch_gate_up(a, s_tok, w_gate_up, act, act_scale, al, k, cfg_up)
    launch_down(act, act_scale, w_down, y, weights, al, cfg_down, cfg_up["BLOCK_N"])
    return gather_sum(y, inv, local_ids, out)


def launch_gate_up(a, s_tok, w_gate_up: QuantTensor, act, act_scale, al, top_k: int, cfg: dict) -> None:
    """act [EM, I] e4m3 and act_scale [EM, I / BN] for the row blocks in use; a [EM, H] e4m3 from permute_fused."""
    e, two_i, h = w_gate_up.shape
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    w2 = w_gate_up.q.view(e, 2, two_i // 2, h)  # [E, gate|up, I, H]
    sms = _num_sms(a.device)
    _gate_up_fp8[(sms,)](
        TensorDescriptor.from_tensor(a, [bm, bk]), TensorDescriptor(w2, list(w2.shape), list(w2.stride()),
                                                                     [1, 2, bn, bk]),
        TensorDescriptor.from_tensor(act, [bm, bn]), act_scale, s_tok, w_gate_up.scale, al.sorted_ids,
        al.block_expert, al.rows_used, al.num_pairs, two_i // 2, h, TOP_K=top_k, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        GROUP_M=cfg["GROUP_M"], NUM_SMS=sms, W_GROUPS=_groups(w_gate_up), PROMOTE=cfg.get("PROMOTE", False),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def _groups(w: QuantTensor) -> int:
    """The kernels' W_GROUPS: 0 for one scale per channel, else the scale columns per row."""
    return 0 if w.per_channel else w.scale.shape[-1]


def launch_down(act, act_scale, w_down: QuantTensor, y, weights, al, cfg: dict, act_group: int) -> None:
    """y [EM, H] = weights[pair] * (dequantized act @ down^T) per row in use; weights [P] float32."""
    e, h, inter = w_down.shape
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    sms = _num_sms(act.device)
    _down_fp8[(sms,)](
        TensorDescriptor.from_tensor(act, [bm, bk]),
        TensorDescriptor.from_tensor(w_down.q.view(e * h, inter), [bn, bk]),
        TensorDescriptor.from_tensor(y, [bm, bn]), act_scale, w_down.scale, al.sorted_ids, weights, al.block_expert,
        al.rows_used, al.num_pairs, h, inter, ACT_GROUP=act_group, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        GROUP_M=cfg["GROUP_M"], NUM_SMS=sms, W_GROUPS=_groups(w_down), PROMOTE=cfg.get("PROMOTE", False),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def w8a8_reference(hidden: torch.Tensor, w_gate_up: QuantTensor, w_down: QuantTensor, local_ids: torch.Tensor,
                   topk_weights: torch.Tensor, act_group: int = DEFAULT_GATE_UP["BLOCK_N"]) -> torch.Tensor:
    """prefill_fp8's numerics in torch (float32 math, e4m3 rounding where the kernels round), per expert over every
    token (rows are independent, so a token's unchosen experts add zero; no data-dependent shapes, no host sync): the
    reference of its tests and benchmark. -> [T, H] float32."""
    def e4m3(x: torch.Tensor, groups: int) -> torch.Tensor:  # x [R, C] -> dequantized, one scale per C / groups
        xs = x.unflatten(-1, (groups, -1))
        step = xs.abs().amax(-1, keepdim=True) / FP8_MAX
        step = torch.where(step > 0, step, torch.ones_like(step))
        return ((xs / step).to(torch.float8_e4m3fn).float() * step).flatten(-2)

    t, num_experts, inter = local_ids.shape[0], w_gate_up.shape[0], w_down.shape[2]
    x = e4m3(hidden.float(), 1)  # [T, H]
    weights = torch.zeros(t, num_experts + 1, device=hidden.device)  # [T, E + 1]; column E: hosted elsewhere
    weights.scatter_add_(1, torch.where(local_ids >= 0, local_ids, num_experts).long(), topk_weights.float())
    out = torch.zeros(t, hidden.shape[1], device=hidden.device)
    for e in range(num_experts):
        gu = x @ w_gate_up[e].dequantize(torch.float32).T  # [T, 2I]
        act = e4m3(torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:], inter // act_group)
        out += (act @ w_down[e].dequantize(torch.float32).T) * weights[:, e, None]  # [T, H]
    return out
