"""The decode-path Triton kernels (gpu/fused_ops.py, paged_attention.py, dense_gemv.py) run on the CPU under Triton's
interpreter, on tiny shapes, against torch: their index arithmetic is checked in CI, which has no GPU. The
interpreter must be chosen before triton.jit decorates the kernels, so the checks run in a fresh interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

from interpreted import PAGED_REFERENCE  # noqa: E402

CHECKS = PAGED_REFERENCE + textwrap.dedent('''
    import torch
    from moemesh.runtime.gpu import dense_gemv, fused_ops, norm_rope, paged_attention

    torch.manual_seed(0)
    x, w = torch.randn(3, 256, dtype=torch.bfloat16), torch.randn(16, 256)
    out = torch.empty(3, 16)
    fused_ops._router_logits[(3, 4)](x, w, out, 16, 256, BLOCK_E=4, BLOCK_K=128)
    assert (out - x.float() @ w.T).abs().max() < 1e-4, "router logits"
    assert (fused_ops.router_logits(x, w) - x.float() @ w.T).abs().max() < 1e-4, "router logits, one row each"
    from moemesh.runtime.gpu import router_gemm
    xs, ws = torch.randn(37, 300, dtype=torch.bfloat16), torch.randn(40, 300)  # ragged rows, experts and K
    part = router_gemm.logits(xs, ws)  # 9-512 rows: split-K partial sums
    assert part.shape == (3, 37, 40) and (part.sum(0) - xs.float() @ ws.T).abs().max() < 1e-3, "router split-K"
    ids, wts = fused_ops.route_softmax(part, 4, True, 1.0)
    want_ids, want_w = fused_ops.route_softmax(part.sum(0), 4, True, 1.0)
    assert torch.equal(ids, want_ids) and torch.allclose(wts, want_w, atol=1e-6), "top-k of the partials' sum"
    from moemesh.runtime.gpu import fused_moe
    from moemesh.runtime.gpu.moe_align import align, align_small
    for t, k, e, block_m in ((1, 8, 128, 16), (64, 8, 128, 8), (37, 8, 128, 64), (7, 2, 6, 32), (5, 4, 9, 8)):
        ids = torch.stack([torch.randperm(e)[:k] for _ in range(t)])
        ids[0, -1] = -1  # hosted elsewhere
        want, got = align(ids, e, block_m), align_small(ids, e, block_m)
        assert torch.equal(want.block_expert, got.block_expert), ("block -> expert", t, k, e, block_m)
        assert torch.equal(want.rows_used, got.rows_used), ("rows used", t, k, e, block_m)
        for b in range(want.block_expert.numel()):  # rows within a block may come in any order
            rows = slice(b * block_m, (b + 1) * block_m)
            assert torch.equal(want.sorted_ids[rows].sort().values, got.sorted_ids[rows].sort().values), (t, b)
    ids = torch.tensor([[0, -1, 3, 2], [-1, -1, 1, 0], [5, 4, -1, 7]])  # -1: hosted elsewhere
    y = torch.randn(12, 300)
    y[ids.reshape(-1) < 0] = float("nan")  # rows the GEMMs never write
    want = torch.where((ids >= 0)[:, :, None], y.view(3, 4, 300), 0.0).sum(1)
    assert torch.allclose(fused_moe.slot_sum(y, ids), want, atol=1e-5), "slot sum"
    ids3, y3 = ids[:, :3], y[:9].nan_to_num(0.0)
    y3[ids3.reshape(-1) < 0] = float("nan")  # a top-k that is no power of two (DeepSeek's 6): masked slots
    want3 = torch.where((ids3 >= 0)[:, :, None], y3.view(3, 3, 300), 0.0).sum(1)
    assert torch.allclose(fused_moe.slot_sum(y3, ids3), want3, atol=1e-5), "slot sum, top-3"
    t, hq, hk, d = 2, 4, 2, 16
    qkv = torch.randn(t, (hq + 2 * hk) * d)
    ref = qkv.clone()
    cos, sin = torch.randn(t, d), torch.randn(t, d)
    kp, vp, slots = torch.zeros(10, hk, d), torch.zeros(10, hk, d), torch.tensor([3, 7])
    norm_rope.norm_rope_(qkv, hq, hk, d, None, None, 0.0, cos, sin, (kp, vp, slots))
    norm_rope.norm_rope_(ref, hq, hk, d, None, None, 0.0, cos, sin)
    assert torch.equal(qkv, ref), "q/k rotated as without the pools"
    assert torch.equal(kp[slots].reshape(t, -1), ref[:, hq * d:(hq + hk) * d]), "K written to its slots"
    assert torch.equal(vp[slots].reshape(t, -1), ref[:, (hq + hk) * d:]), "V written to its slots"
    assert kp.abs().sum() == kp[slots].abs().sum(), "no other slot written"

    b, hq, hkv, d, bs = 2, 8, 2, 16, 4
    kpool, vpool = torch.randn(64, hkv, d), torch.randn(64, hkv, d)
    tables = torch.randperm(16)[:8].view(2, 4).int()
    lens = torch.tensor([13, 5], dtype=torch.int32)
    q = torch.randn(b, hq, d)
    want = paged_reference(q, kpool, vpool, tables, lens, bs, 0.25)
    for splits in (1, 4):
        got = paged_attention.paged_decode_attention(q, kpool, vpool, tables, lens, 0.25, bs, block_n=4,
                                                     splits=splits)
        assert (got - want).abs().max() < 1e-4, f"paged decode, {splits} splits"

    xw, ww = torch.randn(2, 300, dtype=torch.bfloat16), torch.randn(50, 300, dtype=torch.bfloat16)
    bias = torch.randn(50, dtype=torch.bfloat16)
    y = dense_gemv.linear(xw, ww, bias, config={"BLOCK_N": 8, "BLOCK_K": 128, "num_warps": 4})  # 3 K steps
    want = torch.nn.functional.linear(xw.float(), ww.float(), bias.float())
    assert ((y.float() - want).norm() / want.norm()) < 1e-2, "dense GEMV"
    print("ok")
''')


def test_decode_kernels_under_the_triton_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", CHECKS], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
