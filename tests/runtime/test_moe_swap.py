"""The swapped-operand grouped GEMM for quantized experts (gpu/moe_swap.py). On a CPU machine its kernel runs under
Triton's interpreter against the dequantized weights in torch (fp8, int8 and int4, per channel and in 128-column
blocks, ragged K and N, padding rows, a pair whose expert is not hosted, rows past fp16's range), its sm_90 PTX is
checked (weights as the tensor cores' register operand), and the config rule is checked in plain Python. On a GPU
fused_moe's swapped path is checked against its own GEMM, in and out of a CUDA graph, and against the tables."""

from __future__ import annotations

import re
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from interpreted import cuda, interpreter, needs_triton, run_interpreted

CHECKS = textwrap.dedent('''
    import torch
    from moemesh.runtime.gpu import moe_swap as ms
    from moemesh.runtime.gpu.moe_align import align_small
    from moemesh.runtime.quant import quantize

    torch.manual_seed(0)
    e, k, h, inter, t = 4, 2, 320, 96, 5  # K steps of 128 leave a ragged tail (320, 96); N tiles of 64 too (96)
    gu, dn = torch.randn(e, 2 * inter, h) * 0.05, torch.randn(e, h, inter) * 0.05
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(t)])
    ids[0, 1] = -1  # an expert another shard hosts: its pair stays zero
    w = torch.rand(t, k)
    x = torch.randn(t, h).half()
    x[2, 7] = 60000.0  # past 2^15: its row goes through fp16 divided by a power of two
    cfg = {"BLOCK_M": 8, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 2}
    for scheme, block, bk in (("fp8", None, 128), ("int8", None, 128), ("fp8", 128, 128), ("int4", None, 128),
                              ("int4", None, 256)):  # int4 at 256: two packing blocks a step, the last half past K
        cfg["BLOCK_K"] = bk
        gq, dq = quantize(gu, scheme, block), quantize(dn, scheme, block)
        g, d = gq.dequantize(torch.float32), dq.dequantize(torch.float32)
        want = torch.zeros(t * k, h)
        for p, ex in enumerate(ids.reshape(-1).tolist()):
            if ex >= 0:
                gate_up = g[ex] @ x[p // k].float()
                act = torch.nn.functional.silu(gate_up[:inter]) * gate_up[inter:]
                want[p] = w.reshape(-1)[p] * (d[ex] @ act)
        al = align_small(ids, e, cfg["BLOCK_M"])
        act = torch.empty(t * k, inter)  # float32: the down GEMM's rows reach ~1e6, past fp16 (scaled by _fp16)
        y = torch.zeros(t * k, h)
        ms.moe_gemm_swap(x, gq, act, al, k, cfg, up_rows=inter)
        assert act[2 * k:3 * k].abs().max() > 2 ** 15, "token 2's SwiGLU rows pass fp16's range: down scales too"
        ms.moe_gemm_swap(act, dq, y, al, 1, cfg, weights=w.reshape(-1).float().contiguous())
        err = ((y - want).norm() / want.norm()).item()
        assert err < 2e-3, (scheme, block, bk, err)
        assert y[1].abs().sum() == 0, "the pair of the expert not hosted here stays zero"
    h, inter = 256, 128  # whole K steps (EVEN_K: no K masks), int4
    gu, dn = torch.randn(e, 2 * inter, h) * 0.05, torch.randn(e, h, inter) * 0.05
    gq, dq = quantize(gu, "int4"), quantize(dn, "int4")
    g, d = gq.dequantize(torch.float32), dq.dequantize(torch.float32)
    cfg["BLOCK_K"] = 256
    x = torch.randn(t, h).half()
    want = torch.zeros(t * k, h)
    for p, ex in enumerate(ids.reshape(-1).tolist()):
        if ex >= 0:
            gate_up = g[ex] @ x[p // k].float()
            want[p] = w.reshape(-1)[p] * (d[ex] @ (torch.nn.functional.silu(gate_up[:inter]) * gate_up[inter:]))
    al = align_small(ids, e, cfg["BLOCK_M"])
    act, y = torch.empty(t * k, inter), torch.zeros(t * k, h)
    ms.moe_gemm_swap(x, gq, act, al, k, cfg, up_rows=inter)
    ms.moe_gemm_swap(act, dq, y, al, 1, cfg, weights=w.reshape(-1).float().contiguous())
    err = ((y - want).norm() / want.norm()).item()
    assert err < 2e-3, err
    print("ok")
''')


@interpreter
def test_swapped_gemm_matches_the_dequantized_reference_under_the_interpreter():
    run_interpreted(CHECKS)


@needs_triton
@pytest.mark.parametrize("block_m", [8, 16])
def test_weights_are_the_register_operand_on_hopper(block_m):
    """sm_90 PTX: two fp8 weights per cvt.rn.f16x2.e4m3x2 and no bf16 conversion; fp16 tensor-core products, with
    wgmma the weights its first operand as registers ({%r...}) and the tokens the shared-memory descriptor (Triton
    3.6 multiplies 8-row blocks with mma.sync, whose operands are all registers)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_prefill_moe import compile_sm90

    from moemesh.runtime.gpu import moe_swap as ms

    ptrs = {"x_ptr": "*bf16", "w_ptr": "*u8", "c_ptr": "*bf16", "weight_ptr": "*fp32", "sorted_ptr": "*i64",
            "expert_ptr": "*i64", "rows_used_ptr": "*i64", "scale_ptr": "*fp32"}
    ptx = compile_sm90(ms._moe_gemm_swap, ptrs, dict(X_DIV=8, GATED=True, WEIGHTED=False, GROUP_K=0, EVEN_K=True,
                                                      BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=256, FP8=True,
                                                      ASM=False, INT4=False, PDL=False), 4, 3)
    assert "cvt.rn.f16x2.e4m3x2" in ptx and "cvt.bf16.f16" not in ptx
    mma = set(re.findall(r"(?:wgmma\.mma_async|mma\.sync)\S*", ptx))
    assert mma and all(".f32.f16.f16" in m for m in mma), mma
    if any(m.startswith("wgmma") for m in mma):
        assert re.search(r"wgmma\.mma_async[^;]*\}, \{%r", ptx), "A operand from registers"
    int8 = compile_sm90(ms._moe_gemm_swap, {**ptrs, "w_ptr": "*i8"}, dict(
        X_DIV=8, GATED=True, WEIGHTED=False, GROUP_K=0, EVEN_K=True, BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=256,
        FP8=False, ASM=True, INT4=False, PDL=False), 4, 3)
    assert "0x64806480" in int8 and "sub.f16x2" in int8, "int8 weights through I8_F16 (prmt under 0x64, minus 1152)"


def test_config_rule(monkeypatch):
    """Tuned entries serve the steps up to their token count; beyond the largest, and in a table without entries of
    the kind (swept, the swap lost), fused_moe's GEMM; untuned shapes use the defaults up to SWAP_MAX_TOKENS;
    MOEMESH_MOE_SWAP=0 (ENABLED) turns it off."""
    from moemesh.runtime.gpu import moe_swap as ms

    tuned = {8: {"swap_gate_up": {"BLOCK_M": 8}}, 64: {"swap_gate_up": {"BLOCK_M": 16}}, 128: {"down": {}}}
    assert [ms.config(t, tuned, "swap_gate_up")["BLOCK_M"] for t in (1, 8, 9, 64)] == [8, 8, 16, 16]
    assert ms.config(65, tuned, "swap_gate_up") is None and ms.config(8, tuned, "swap_down") is None
    for scheme, most in ms.SWAP_MAX_TOKENS.items():  # int4: 0, only where a table was tuned
        assert (ms.config(most, {}, "swap_down", scheme) is not None) == (most > 0)
        assert ms.config(most + 1, {}, "swap_down", scheme) is None
    monkeypatch.setattr(ms, "ENABLED", False)
    assert ms.config(8, tuned, "swap_gate_up") is None


@cuda
@pytest.mark.parametrize("scheme, block_k, tol", [("fp8", None, 1e-3), ("fp8", 128, 1e-3), ("int8", None, 1e-3),
                                                  ("int4", None, 3e-2)])
def test_swapped_fused_moe_matches_its_gemm(scheme, block_k, tol, monkeypatch):
    """fused_moe through the swap (forced with SWAP_DEFAULT's configs, whatever the tables say) at 8-200 tokens of
    Qwen3-30B-A3B's layer shape, against the same call on its GEMM (configs given); with activations past fp16's
    range (their SwiGLU outputs far past it: rows scaled by powers of two); replayed in a CUDA graph with new
    routing. tol: int4's GEMM rounds its activations to int8 (1.6%), the swap not."""
    from moemesh.runtime.gpu import fused_moe as fm
    from moemesh.runtime.gpu import moe_swap as ms
    from moemesh.runtime.quant import quantize

    e, k, h, inter = 128, 8, 2048, 768
    gu = quantize(torch.randn(e, 2 * inter, h, device="cuda", dtype=torch.bfloat16) * 0.02, scheme, block_k)
    dn = quantize(torch.randn(e, h, inter, device="cuda", dtype=torch.bfloat16) * 0.02, scheme, block_k)
    def run(x, ids, w, swap: bool):
        t = x.shape[0]
        cfg = ms.SWAP_DEFAULT[min(m for m in ms.SWAP_DEFAULT if m >= min(t, 256))]
        monkeypatch.setattr(fm, "swap_configs", lambda tokens, wgu: (cfg, cfg) if swap else None)
        monkeypatch.setattr(fm, "gemv_max_pairs", lambda wgu: 0)  # the GEMM (int4: I8) as the reference at 8 too
        return fm.fused_moe(x, gu, dn, ids, w)

    for t in (8, 64, 200):
        x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
        w, ids = torch.randn(t, e, device="cuda").softmax(-1).topk(k, dim=-1)
        if t == 64:
            x[3, 5], x[9, 700] = 3e5, -7e4
        got, want = run(x, ids, w, True), run(x, ids, w, False)
        assert torch.isfinite(got).all() and ((got - want).norm() / want.norm()).item() < tol, t
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = run(x, ids, w, True)
    w2, ids2 = torch.randn(t, e, device="cuda").softmax(-1).topk(k, dim=-1)
    w.copy_(w2)
    ids.copy_(ids2)
    g.replay()
    want = run(x, ids, w, False)
    assert ((out - want).norm() / want.norm()).item() < tol


@cuda
def test_fused_moe_takes_the_swap_where_the_tables_say():
    """On the H200, fp8 experts of Qwen3-30B-A3B's shape from its table (8-256 tokens), int8 from its own (8-64 and
    129-256: "swap": false at 128); elsewhere fp8 up to SWAP_MAX_TOKENS and int8 not at all (no table, no default)."""
    from moemesh.runtime.gpu import moe_swap as ms
    from moemesh.runtime.gpu.fused_moe import swap_configs
    from moemesh.runtime.quant import quantize

    e, k, h, inter = 128, 8, 2048, 768
    fp8 = quantize(torch.zeros(e, 2 * inter, h, device="cuda", dtype=torch.bfloat16), "fp8")
    int8 = quantize(torch.zeros(e, 2 * inter, h, device="cuda", dtype=torch.bfloat16), "int8")
    most = 256 if torch.cuda.get_device_name() == "NVIDIA H200" else ms.SWAP_MAX_TOKENS["fp8"]
    assert swap_configs(most, fp8) is not None and swap_configs(most + 1, fp8) is None
    h200 = torch.cuda.get_device_name() == "NVIDIA H200"
    assert all((swap_configs(t, int8) is not None) == h200 for t in (64, 129, 256))
    assert all(swap_configs(t, int8) is None for t in (65, 128, 257))


def test_a_lost_count_stops_a_larger_counts_swap(monkeypatch):
    """A table entry with "swap": false (swap_sweep --write, where the swap lost) keeps the swap's larger-count entry
    from reaching down to it: steps up to that count run fused_moe's GEMM, steps above it the larger entry."""
    from moemesh.runtime.gpu import moe_swap as ms

    monkeypatch.setattr(ms, "ENABLED", True)
    won = {"swap_gate_up": {"BLOCK_M": 8, "BLOCK_N": 64}, "swap_down": {"BLOCK_M": 8, "BLOCK_N": 128}}
    tuned = {8: won, 64: won, 128: {"swap": False}, 256: won}
    assert [ms.config(t, tuned, "swap_down") is not None for t in (1, 64, 65, 128, 129, 256, 257)] == [
        True, True, False, False, True, True, False]
    assert ms.config(200, tuned, "swap_gate_up") == won["swap_gate_up"]
    assert ms.config(100, {64: won, 256: won}, "swap_gate_up") == won["swap_gate_up"]  # without the mark: reaches
