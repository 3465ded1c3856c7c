"""Run by test_gpu_int4.py in a subprocess with TRITON_INTERPRET=1 (the variable must be set before the kernels are
defined): the fused int4 MoE kernels on the CPU, through Triton's interpreter, against a dequantized torch
reference, for each variant of the weights (group size, zero points). Prints one JSON object: {"rel": {"<variant>
T=<tokens>": relative error}, "elsewhere_row": max |row| of a token whose experts are all hosted elsewhere}.

float16, not bfloat16: Triton 3.9's interpreter computes tl.dot on bfloat16 operands wrongly (checked: 1e10 errors
on a 16x16 product; float16 and float32 are exact), and the kernels take both.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.nn.functional as F

from moemesh.runtime.gpu.fused_moe import GEMV_MAX_PAIRS, default_config, fused_moe, moe_gemv
from moemesh.runtime.quant import quantize_int4

E, H, I, K = 4, 256, 192, 2  # down's K = 192: a partial second 128-column group
DT = torch.float16


def reference(hidden, gate_up, down, ids, weights, x_step=None):
    """sum_k weight * SwiGLU expert, the activation rounded to DT as the kernel stores it; ids -1 contribute 0.
    x_step 128 / 32: each product's input rounded to int8 per that many columns first (int4_dp4a.py's activations)."""
    q = (lambda x: int8_blocks(x, x_step)) if x_step else (lambda x: x.float())
    out = torch.zeros(hidden.shape[0], H)
    for t in range(hidden.shape[0]):
        for k in range(K):
            e = int(ids[t, k])
            if e >= 0:
                g, u = (q(hidden[t]) @ gate_up[e].T).chunk(2)
                out[t] += weights[t, k] * (q((F.silu(g) * u).to(DT)) @ down[e].T)
    return out


def int8_blocks(x, cols):
    """x [K] -> float32 x rounded to int8 steps of absmax / 127 per `cols` columns (half away from zero)."""
    x = x.float()
    pad = torch.cat([x, x.new_zeros(-x.numel() % cols)]).view(-1, cols)
    step = pad.abs().amax(1, keepdim=True) / 127
    step = torch.where(step > 0, step, torch.ones_like(step))
    v = pad / step
    return ((v + torch.where(v >= 0, 0.5, -0.5)).trunc() * step).reshape(-1)[:x.numel()]


VARIANTS = {"sym128": (128, True, (1, 20)), "asym32": (32, False, (1, 20)), "sym64": (64, True, (1, 20)),
            "asym128": (128, False, (1, 20)), "sym128-magic": (128, True, (20,)),
            "asym32-magic": (32, False, (20,)), "sym64-magic": (64, True, (20,)), "sym128-words": (128, True, (1, 3)),
            "sym128-dp4a": (128, True, (1, 3)), "sym128-dp4a32": (128, True, (1, 3)),
            "sym128-i8": (128, True, (20,))}
# (group, symmetric, token counts): every int4 kernel branch; -magic: the GEMM with codes made floats by _magic;
# -words: the word-wise GEMV (int4_kernels._int4_words_dot, what the H200's table runs at 1-4 tokens)
# -dp4a: the word-wise GEMV on integer dot products (int4_dp4a.py), against the reference with int8 activations;
# -i8: the GEMM's candidate on int8 tensor cores (int4_dp4a._int4_mac_i8), likewise
GEMV_CONFIGS = {"words": {"BLOCK_N": 8, "BLOCK_K": 256, "num_warps": 4, "num_stages": 1, "WORDS": True},
                "dp4a": {"BLOCK_N": 8, "BLOCK_K": 256, "num_warps": 4, "num_stages": 1, "WORDS": True, "DP4A": 128},
                "dp4a32": {"BLOCK_N": 8, "BLOCK_K": 256, "num_warps": 4, "num_stages": 1, "WORDS": True, "DP4A": 32}}


def word_gemv(hidden, gu, dn, ids, weights, variant):
    """The few-token path with an int4 GEMV variant (GEMV_CONFIGS), both kernels."""
    pairs = ids.reshape(-1).long().contiguous()
    act = torch.empty(pairs.numel(), I, dtype=DT, device=hidden.device)
    out = torch.zeros(hidden.shape[0], H, dtype=torch.float32, device=hidden.device)
    cfg = GEMV_CONFIGS[variant]
    moe_gemv(hidden, gu, act, pairs, K, cfg, up_rows=I)
    return moe_gemv(act, dn, out, pairs, 1, cfg, weights=weights.reshape(-1).float().contiguous(), sum_slots=K)


def configs(name: str, t: int):
    """fused_moe's config override: None (its own choice), or the default tiles with MAGIC for -magic variants (I8,
    the GEMM on int8 tensor cores, for -i8)."""
    flag = {"magic": "MAGIC", "i8": "I8"}.get(name.rsplit("-", 1)[-1])
    if not flag:
        return None
    return tuple({**default_config(t, kind), flag: True} for kind in ("gate_up", "down"))


def main(names: list[str]) -> None:
    """names: VARIANTS to run (all when empty)."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    assert 20 * K > GEMV_MAX_PAIRS  # 20 tokens take the GEMM path, 1 the GEMV
    torch.manual_seed(0)
    rel, elsewhere = {}, 0.0
    for name in names or VARIANTS:
        group, symmetric, tokens = VARIANTS[name]
        gu = quantize_int4(torch.randn(E, 2 * I, H) * 0.05, group, symmetric)
        dn = quantize_int4(torch.randn(E, H, I) * 0.05, group, symmetric)
        gu_ref, dn_ref = gu.dequantize(torch.float32), dn.dequantize(torch.float32)
        for t in tokens:
            hidden = torch.randn(t, H).to(DT)
            weights, ids = torch.randn(t, E).softmax(-1).topk(K)
            ids[0, -1] = -1  # an unused slot
            if t > 1:
                ids[1] = -1  # every expert of token 1 hosted elsewhere: its row must stay zero
            variant = name.rsplit("-", 1)[-1]
            if variant in GEMV_CONFIGS:
                got = word_gemv(hidden, gu, dn, ids, weights, variant)
            else:
                got = fused_moe(hidden, gu, dn, ids, weights, configs(name, t))
            step = {"dp4a": 128, "dp4a32": 32, "i8": 128}.get(variant)  # the activations' int8 rounding, if any
            want = reference(hidden, gu_ref, dn_ref, ids, weights, x_step=step)
            rel[f"{name} T={t}"] = ((got - want).norm() / want.norm()).item()
            if t > 1:
                elsewhere = max(elsewhere, got[1].abs().max().item())
    print(json.dumps({"rel": rel, "elsewhere_row": elsewhere}))


if __name__ == "__main__":
    main(sys.argv[1:])
