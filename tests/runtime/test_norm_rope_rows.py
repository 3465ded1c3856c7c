"""norm_rope_ at prefill sizes (gpu/norm_rope_rows.py): the same values as the one-program-per-head decode kernel
(under Triton's interpreter on a CPU machine), compiled for sm_90, and against the torch RMSNorm + RoPE on a GPU."""

from __future__ import annotations

import textwrap

import torch

from interpreted import cuda, interpreter, needs_triton, run_interpreted

CHECKS = textwrap.dedent('''
    import torch
    from moemesh.runtime.gpu import norm_rope, norm_rope_rows

    torch.manual_seed(0)
    t, hq, hk, d = 37, 4, 2, 32  # 37: a last block of 5 tokens
    for norm in (False, True):
        qkv = torch.randn(t, (hq + 2 * hk) * d, dtype=torch.float16)
        qw, kw = (torch.rand(d, dtype=torch.float16) + 0.5 for _ in range(2))
        cos, sin = torch.randn(t, d, dtype=torch.float16), torch.randn(t, d, dtype=torch.float16)
        weights = (qw, kw) if norm else (None, None)
        ref = qkv.clone()
        for i in range(t):  # the decode kernel, one token at a time (below MIN_TOKENS)
            norm_rope.norm_rope_(ref[i:i + 1], hq, hk, d, *weights, 1e-6, cos[i:i + 1], sin[i:i + 1])
        norm_rope_rows.norm_rope_rows_(qkv, hq, hk, d, *weights, 1e-6, cos, sin)
        assert torch.equal(qkv, ref), (norm, (qkv.float() - ref.float()).abs().max().item())
    print("ok")
''')


@interpreter
def test_norm_rope_rows_matches_the_decode_kernel_under_the_interpreter():
    run_interpreted(CHECKS)


@needs_triton
def test_norm_rope_rows_compiles_for_hopper_without_spills(tmp_path):
    from test_prefill_moe import PTXAS, _ptxas_report, compile_sm90

    from moemesh.runtime.gpu import norm_rope_rows as nr

    types = {n: "*bf16" for n in ("qkv_ptr", "qw_ptr", "kw_ptr", "cos_ptr", "sin_ptr")}
    types["eps"] = "fp32"
    ptx = compile_sm90(nr._norm_rope_rows, types, dict(Q_HEADS=32, D=128, NORM=True, ROWS=nr.ROWS), 4, 3)
    if PTXAS:
        assert "0 bytes spill stores" in _ptxas_report(ptx, tmp_path)


@cuda
def test_norm_rope_at_prefill_size_matches_torch():
    from moemesh.runtime.gpu.norm_rope import norm_rope_
    from moemesh.runtime.gpu.norm_rope_rows import MIN_TOKENS
    from moemesh.runtime.layers import RMSNorm
    from moemesh.runtime.rope import Rotary
    from moemesh.runtime.spec import RopeSpec

    t, hq, hk, dim = MIN_TOKENS + 45, 32, 4, 128
    qkv = torch.randn(t, (hq + 2 * hk) * dim, device="cuda", dtype=torch.bfloat16)
    qw, kw = (torch.rand(dim, device="cuda", dtype=torch.bfloat16) + 0.5 for _ in range(2))
    rotary = Rotary(RopeSpec(1e6, dim, False, 40960), "cuda")
    cos, sin = rotary.table(torch.arange(t, device="cuda"), torch.bfloat16)
    q = rotary.apply(RMSNorm(qw, 1e-6)(qkv[:, :hq * dim].view(t, hq, dim)), cos, sin)
    k = rotary.apply(RMSNorm(kw, 1e-6)(qkv[:, hq * dim:(hq + hk) * dim].view(t, hk, dim)), cos, sin)
    v = qkv[:, (hq + hk) * dim:].clone()
    norm_rope_(qkv, hq, hk, dim, qw, kw, 1e-6, cos.view(t, dim), sin.view(t, dim))

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()
    assert rel(qkv[:, :hq * dim], q.reshape(t, -1)) < 1e-2 and rel(qkv[:, hq * dim:(hq + hk) * dim],
                                                                    k.reshape(t, -1)) < 1e-2
    assert torch.equal(qkv[:, (hq + hk) * dim:], v)
