"""The q8 int4 expert GEMVs (moemesh/runtime/gpu/int4_q8.py) against float32 references: one whose activations are
rounded to int8 exactly as the kernels round them (the kernels' own error), and the plain one (the rounding's cost).
Run by test_int4_q8.py under Triton's interpreter (CPU) or compiled (CUDA); prints "ok"."""

from __future__ import annotations

import torch

from moemesh.runtime.gpu.int4_q8 import moe_q8, quantize_rows
from moemesh.runtime.quant import quantize

E, I, H, K = 8, 128, 256, 4


def rounded(x: torch.Tensor, group: int) -> torch.Tensor:
    """x [R, N] float32 as the kernels see it: int8 codes times absmax / 127 per group, halves away from zero."""
    g = x.reshape(x.shape[0], -1, group)
    amax = g.abs().amax(-1, keepdim=True)
    step = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    v = g / step
    return ((v + torch.where(v >= 0, 0.5, -0.5)).trunc() * step).reshape(x.shape)


def reference(hidden, gu, dn, ids, weights, group, act_group):
    """[T, H] float32: sum over slots of weight * down(silu(gate) * up), activations rounded when groups are set."""
    gq, dq = gu.dequantize(torch.float32), dn.dequantize(torch.float32)
    x = hidden.float()
    x = rounded(x, group) if group else x
    out = torch.zeros(x.shape[0], H, device=x.device)
    for t in range(x.shape[0]):
        for s in range(K):
            e = int(ids[t, s])
            if e < 0:
                continue
            g, u = (x[t:t + 1] @ gq[e].T).chunk(2, dim=1)
            a = torch.nn.functional.silu(g) * u
            a = rounded(a, act_group) if act_group else a
            out[t] += weights[t, s] * (a @ dq[e].T)[0]
    return out


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def main(device: str) -> None:
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    gu = quantize(torch.randn(E, 2 * I, H, device=device) / 20, "int4")
    dn = quantize(torch.randn(E, H, I, device=device) / 16, "int4")
    hidden = torch.randn(2, H, device=device).to(dtype)
    ids = torch.tensor([[3, 0, 7, 5], [1, -1, 6, 3]], device=device)  # -1: an expert hosted elsewhere
    weights = torch.rand(2, K, device=device)
    xq, xs = quantize_rows(hidden, 32)
    assert torch.equal(xq.float() * xs.repeat_interleave(32, 1), rounded(hidden.float(), 32)), "quantize_rows"
    for group, act_group, warps in ((32, 8, 2), (8, 16, 4), (64, 32, 4)):
        cfg_gu = {"G": group, "BLOCK_N": act_group, "BLOCK_K": 256, "num_warps": warps}
        cfg_dn = {"BLOCK_N": 16, "BLOCK_K": 256, "num_warps": 2}
        got = moe_q8(hidden, gu, dn, ids.reshape(-1), weights.reshape(-1), cfg_gu, cfg_dn)
        exact = reference(hidden, gu, dn, ids, weights, group, act_group)
        plain = reference(hidden, gu, dn, ids, weights, 0, 0)
        assert rel(got, exact) < 2e-3, (group, act_group, rel(got, exact))
        assert rel(got, plain) < 3e-2, (group, act_group, rel(got, plain))
    assert moe_q8(hidden[:0], gu, dn, ids[:0].reshape(-1), weights[:0].reshape(-1), cfg_gu, cfg_dn).shape == (0, H)
    print("ok")


if __name__ == "__main__":
    import sys

    main(sys.argv[1] if len(sys.argv) > 1 else "cpu")
