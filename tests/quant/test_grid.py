"""Grid recovery: weights already on a per-group 4-bit grid with a float offset (GGUF Q4_1) are re-encoded exactly,
through the checkpoint and through ORT's integer-zero MatMulNBits plus the fractional-zero correction."""

from __future__ import annotations

import numpy as np
import torch

from moemesh.quant.formats import QuantizedLayout
from moemesh.quant.grid import grid, grid_params, on_grid
from moemesh.quant.packing import rtn
from moemesh.quant.writer import packed_tensors, quantization_config
from moemesh.runtime.ort.graph import Builder
from moemesh.runtime.ort.session import Graph


def q4_1(n: int, k: int) -> torch.Tensor:
    """w = d*q + m per group of 32, d and m in fp16 as GGUF stores them (m not a multiple of d)."""
    g = k // 32
    d = (torch.rand(n, g, 1) * 0.05 + 0.01).half().float()
    m = (-torch.rand(n, g, 1) * 0.4).half().float()
    return (d * torch.randint(0, 16, (n, g, 32)).float() + m).view(n, k)


def test_q4_1_weights_are_recovered_exactly_where_rtn_is_not() -> None:
    torch.manual_seed(0)
    w = q4_1(64, 128)
    qw = grid(w, 4, 32, rtn(w, 4, 32))
    assert torch.allclose(qw.dequantize(), w, atol=1e-6)
    assert (rtn(w, 4, 32).dequantize() - w).abs().max() > 1e-3


def test_float_weights_do_not_fit_a_grid() -> None:
    _, _, fits = grid_params(torch.randn(16, 64), 4, 32)
    assert not fits.any()


def test_on_grid_takes_a_whole_weight_or_none() -> None:
    """ORT's choice for a float checkpoint's weight: its exact codes when every group is on its widest grid (llama.cpp's
    Q4_1 quantizer gives each block's min code 0 and its max 15), else None (one group off, columns not whole
    groups), so the caller rounds it."""
    torch.manual_seed(2)
    d, m = (torch.rand(32, 3, 1) * 0.05 + 0.01).half().float(), (-torch.rand(32, 3, 1) * 0.4).half().float()
    codes = torch.randint(0, 16, (32, 3, 32)).float()
    codes[..., 0], codes[..., 1] = 0, 15
    w = (d * codes + m).view(32, 96)
    qw = on_grid(w)
    assert qw is not None and qw.zero_f is not None and torch.allclose(qw.dequantize(), w, atol=1e-6)
    off = w.clone()
    off[3, 40] += 1e-3
    assert on_grid(off) is None and on_grid(w[:, :80]) is None


def test_fractional_zero_points_survive_the_checkpoint_and_ort() -> None:
    torch.manual_seed(1)
    w = q4_1(48, 96)
    qw = grid(w, 4, 32, rtn(w, 4, 32))
    tensors = packed_tensors("m.p", qw, torch.float32, False)
    layout = QuantizedLayout(quantization_config({4: ["m.p"]}, 32, False, (4,)), set(tensors))
    assert torch.allclose(layout.qweight("m.p.weight", tensors.__getitem__).dequantize(), w, atol=1e-6)
    b = Builder(accuracy=1)
    graph = Graph(b.model([("x", ["T", 96])], [(b.matmul_q("x", qw), "y")]))
    x = torch.randn(3, 96)
    np.testing.assert_allclose(graph.run(x=x)[0].numpy(), (x @ w.T).numpy(), atol=1e-3)
