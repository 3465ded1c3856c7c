"""Grid recovery: weights that already lie on a per-group 4-bit grid (GGUF Q4_1 / Q4_0 dequantized, as the built-in
SmolLM2 is) re-encoded exactly, instead of re-quantized with a second rounding.

In a group of `group` columns a Q4_1 weight is w = d*q + m, q in 0..15. With lo, hi the group's extremes,
(hi - lo) / d = r is an integer <= 15; the largest r for which every (w - lo) / ((hi - lo) / r) is within TOL of an
integer gives d, the codes and the fractional zero point z_f = -lo / d (w = (q - z_f) * d exactly). Groups that fit
no grid (float weights, or columns permuted across blocks, e.g. the down projections of a converted MoE) take the
`fallback` quantizer's parameters for that group.
"""

from __future__ import annotations

import torch

from moemesh.quant.packing import QWeight, check_group

TOL = 2e-3  # of one grid step: GGUF dequantizes in float32 from fp16 d and m, so true grid points are much closer


def grid_params(w: torch.Tensor, bits: int, group: int,
                widest_only: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scale [N, G], zero_f [N, G], fits [N, G] bool) for w [N, K]. widest_only: only r = 2**bits - 1, the grid
    llama.cpp's Q4_1 quantizer makes (each block's min and max take codes 0 and 15): one pass instead of 15."""
    n, k = w.shape
    check_group(k, group)
    x = w.float().view(n, k // group, group)  # float32: a grid point lands within ~1e-6 of a step of its integer
    lo, hi = x.amin(-1), x.amax(-1)
    scale, fits = torch.ones_like(lo), torch.zeros_like(lo, dtype=torch.bool)
    for r in range(2**bits - 1 if widest_only else 1, 2**bits):  # larger r wins: a grid of step d also fits d * j
        step = ((hi - lo) / r).clamp(min=1e-30)
        t = (x - lo[..., None]) / step[..., None]
        ok = ((t - t.round()).abs().amax(-1) < TOL) & (hi > lo)
        scale, fits = torch.where(ok, step, scale), fits | ok
    return scale.float(), (-lo / scale).float(), fits


def grid(w: torch.Tensor, bits: int, group: int, fallback: QWeight) -> QWeight:
    """Exact codes where a group fits a grid, `fallback`'s (q, scale, zero) elsewhere."""
    n, k = w.shape
    scale, zero_f, fits = grid_params(w, bits, group)
    scale = torch.where(fits, scale, fallback.scale)
    zero_f = torch.where(fits, zero_f, fallback.zero.float())
    x = w.float().view(n, k // group, group) / scale[..., None] + zero_f[..., None]
    q = torch.where(fits[..., None], x.round().clamp(0, 2**bits - 1), fallback.q.view(n, k // group, group).float())
    zero = zero_f.round().clamp(0, 2**bits - 1).to(torch.uint8)
    return QWeight(q.to(torch.uint8).view(n, k), scale, zero, bits, group, zero_f)


def on_grid(w: torch.Tensor, bits: int = 4, group: int = 32) -> QWeight | None:
    """w [N, K] as its exact codes when every `group` columns are 2**bits evenly spaced levels from their min to their
    max (llama.cpp's Q4_1 blocks dequantized: the built-in model's attention and gate / up projections), else None
    (then the caller's quantizer rounds it). What both CPU backends keep of a float checkpoint's weights (ONNX Runtime
as is, packed through packed.grid_codes)."""
    n, k = w.shape
    if k % group or not w.is_floating_point():
        return None
    w = w.detach()
    scale, zero_f, fits = grid_params(w, bits, group, widest_only=True)
    if not bool(fits.all()):
        return None
    q = (w.float().view(n, k // group, group) / scale[..., None] + zero_f[..., None]).round().clamp(0, 2**bits - 1)
    zero = zero_f.round().clamp(0, 2**bits - 1).to(torch.uint8)
    return QWeight(q.to(torch.uint8).view(n, k), scale, zero, bits, group, zero_f)
