"""Large int4 steps through dequantized experts and prefill_moe (gpu/int4_prefill.py): the dequantization kernel
against QuantTensor.dequantize, the chunked path against a per-expert torch loop (Triton's interpreter on a CPU
machine, float16 as test_prefill_moe.py), when fused_moe takes it, and on a GPU against fused_moe on the same
weights dequantized."""

from __future__ import annotations

import textwrap

import torch

from interpreted import hopper, interpreter, needs_triton, run_interpreted


# Runs in a fresh interpreter: TRITON_INTERPRET must be set before triton.jit decorates the kernels.
CHECKS = textwrap.dedent('''
    import torch
    from moemesh.runtime.gpu import int4_prefill as ip
    from moemesh.runtime.quant import quantize_int4

    torch.manual_seed(0)
    F16 = torch.float16
    for group, symmetric, n, k in ((128, True, 48, 256), (32, False, 40, 96), (64, True, 16, 64)):
        w = quantize_int4(torch.randn(3, n, k) * 0.05, group, symmetric)
        got = ip.dequantize_into(w, torch.empty(3, n, k, dtype=F16))
        assert torch.equal(got, w.dequantize(F16)), (group, symmetric, k)
    w = quantize_int4(torch.randn(3, 48, 256) * 0.05, 128, True)
    codes = ip.as_fp8(w, torch.empty(3, 48, 256, dtype=torch.float8_e4m3fn))  # code - 8 in e4m3, w's own scales
    assert torch.equal(codes.dequantize(torch.float32), w.dequantize(torch.float32)) and codes.scheme == "fp8"

    t, kk, e, h, inter = 37, 4, 6, 128, 64
    cfg = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2, "num_warps": 4, "num_stages": 2}
    gu = quantize_int4(torch.randn(e, 2 * inter, h) * 0.1, 32, False)
    dn = quantize_int4(torch.randn(e, h, inter) * 0.1, 128, True)
    hid = torch.randn(t, h, dtype=F16)
    w, ids = torch.randn(t, e).softmax(-1).topk(kk, -1)
    ids[0, -1] = -1  # one slot hosted elsewhere
    ids[3] = -1  # every expert of token 3 elsewhere: its row stays zero
    wgu, wdn = gu.dequantize(torch.float32), dn.dequantize(torch.float32)
    want = torch.zeros(t, h)
    for tt in range(t):
        for s in range(kk):
            x = int(ids[tt, s])
            if x >= 0:
                g, u = (wgu[x] @ hid[tt].float()).chunk(2)
                act = (torch.nn.functional.silu(g) * u).to(F16).float()
                want[tt] += w[tt, s] * (wdn[x] @ act)
    per_expert = (2 * inter * h + h * inter) * 2
    for budget in (e * per_expert, 4 * per_expert, per_expert):  # one chunk, two (4 + 2 experts), six
        ip.SCRATCH_BYTES = budget
        ip._scratch.cache_clear()
        got = ip.int4_prefill(hid, gu, dn, ids, w, configs=(cfg, cfg))
        rel = ((got - want).norm() / want.norm()).item()
        assert got.dtype == torch.float32 and rel < 2e-3, (budget, rel)
        assert got[3].abs().max().item() == 0.0, budget
    print("ok")
''')


@interpreter
def test_dequantization_and_chunked_prefill_under_the_triton_interpreter():
    run_interpreted(CHECKS)


def test_fused_moe_takes_it_for_large_int4_steps_only():
    """wanted(): int4 stacks of both weights, >= MIN_TOKENS tokens, on a GPU prefill_moe can serve; never for
    bf16 weights, short steps or CPU tensors (the row-block GEMM / torch paths stay)."""
    from moemesh.runtime.gpu import int4_prefill as ip
    from moemesh.runtime.quant import quantize_int4

    gu = quantize_int4(torch.randn(2, 256, 256) * 0.05, 128, True)  # I 128, H 256: prefill_moe's block multiples
    dn = quantize_int4(torch.randn(2, 256, 128) * 0.05, 128, True)
    hidden = torch.randn(ip.MIN_TOKENS, 256, dtype=torch.bfloat16)
    assert not ip.wanted(hidden, gu, dn)  # CPU tensors
    assert not ip.wanted(hidden, gu.dequantize(torch.bfloat16), dn.dequantize(torch.bfloat16))
    if torch.cuda.is_available():
        gu, dn, hidden = gu.to("cuda"), dn.to("cuda"), hidden.cuda()
        sm90 = torch.cuda.get_device_capability()[0] >= 9
        assert ip.wanted(hidden, gu, dn) == sm90
        assert not ip.wanted(hidden[:ip.MIN_TOKENS - 1], gu, dn)


def _qwen3_int4_layer(t: int, e: int = 128, h: int = 2048, inter: int = 768, k: int = 8):
    """(hidden [t, H] bf16, int4 gate_up, int4 down, ids, weights) of a Qwen3-30B-A3B-shaped layer on the GPU."""
    from moemesh.runtime.quant import quantize

    torch.manual_seed(0)
    gu = quantize(torch.randn(e, 2 * inter, h, device="cuda") / 45, "int4")
    dn = quantize(torch.randn(e, h, inter, device="cuda") / 28, "int4")
    hidden = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
    w, ids = torch.randn(t, e, device="cuda").softmax(-1).topk(k, -1)
    return hidden, gu, dn, ids, w


@hopper
def test_int4_prefill_matches_prefill_moe_on_the_dequantized_weights(monkeypatch):
    """Qwen3-30B-A3B's expert shapes at 2,048 tokens, every expert touched: the chunked path (two chunks) against
    prefill_moe given the same weights dequantized by QuantTensor.dequantize."""
    from moemesh.runtime.gpu import int4_prefill as ip
    from moemesh.runtime.gpu import prefill_moe
    from moemesh.runtime.gpu.fused_moe import fused_moe

    hidden, gu, dn, ids, w = _qwen3_int4_layer(2048)
    h, inter = hidden.shape[1], dn.shape[2]
    want = prefill_moe.prefill_moe(hidden, gu.dequantize(torch.bfloat16), dn.dequantize(torch.bfloat16), ids, w)
    assert ip.wanted(hidden, gu, dn)
    monkeypatch.setattr(ip, "FP8", False)  # the bf16 route (the e4m3 one: the next test)
    got = fused_moe(hidden, gu, dn, ids, w)  # fused_moe hands it to int4_prefill
    assert ((got - want).norm() / want.norm()).item() < 1e-3
    budget, ip.SCRATCH_BYTES = ip.SCRATCH_BYTES, 64 * (3 * inter * h * 2)  # 64 experts a chunk: two chunks
    try:
        got = ip.int4_prefill(hidden, gu, dn, ids, w)
    finally:
        ip.SCRATCH_BYTES = budget
    assert ((got - want).norm() / want.norm()).item() < 1e-3


@hopper
def test_symmetric_int4_prefill_runs_on_fp8_tensor_cores():
    """Symmetric int4 with 128-column groups from 1,024 tokens: the codes as e4m3 (exact) with their group scales,
    W8A8 through prefill_fp8 (activations rounded to e4m3: prefill_fp8's error budget against the bf16 route)."""
    from moemesh.runtime.gpu import int4_prefill as ip
    from moemesh.runtime.gpu import prefill_fp8
    from moemesh.runtime.gpu.fused_moe import fused_moe

    t = 1024
    hidden, gu, dn, ids, w = _qwen3_int4_layer(t)
    assert ip.fp8_wanted(hidden, gu, dn) and not ip.fp8_wanted(hidden[:t // 2], gu, dn)
    got = fused_moe(hidden, gu, dn, ids, w)
    codes_gu = ip.as_fp8(gu, torch.empty(gu.shape, dtype=torch.float8_e4m3fn, device="cuda"))
    codes_dn = ip.as_fp8(dn, torch.empty(dn.shape, dtype=torch.float8_e4m3fn, device="cuda"))
    want = prefill_fp8.w8a8_reference(hidden, codes_gu, codes_dn, ids, w)
    assert ((got - want).norm() / want.norm()).item() < 2e-2
    bf16 = ip.int4_prefill(hidden, gu, dn, ids, w, fp8=False)
    assert ((got - bf16).norm() / bf16.norm()).item() < 6e-2  # the activations' e4m3 rounding


@needs_triton
def test_dequantization_kernel_compiles_for_hopper_with_wide_stores():
    """The compiled path (the interpreter runs the Python semantics only), symmetric groups of 128 (what
    quantize() makes) and asymmetric groups of 32 (checkpoints): 16-byte packed loads."""
    from test_prefill_moe import compile_sm90

    from moemesh.runtime.gpu.int4_prefill import ROWS, _dequant

    types = {"q_ptr": "*u8", "s_ptr": "*fp32", "z_ptr": "*fp32", "out_ptr": "*bf16"}  # strides: i32, 16-aligned
    for group, zp in ((128, False), (32, True)):
        ptx = compile_sm90(_dequant, types, dict(GROUP=group, ZP=zp, BLOCKS=16, BLOCK_R=ROWS, CODES=False), 4, 1)
        assert "ld.global.v4.b32" in ptx and "st.global.v4.b32" in ptx, group
    ptx = compile_sm90(_dequant, {**types, "out_ptr": "*fp8e4nv"}, dict(GROUP=128, ZP=False, BLOCKS=16, BLOCK_R=ROWS,
                                                                        CODES=True), 4, 1)
    assert "ld.global.v4.b32" in ptx and "st.global" in ptx  # e4m3 codes: 8 bytes a thread and store
