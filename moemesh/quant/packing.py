"""Group-wise integer weight quantization of a [N, K] (out, in) weight and the packings different consumers want.

Convention everywhere in moemesh.quant: a weight W [N, K] is cut along K into groups of `group` columns; each
(row, group) has a float scale and an integer zero point z in [0, 2^bits): W ~= (q - z) * scale with q in
[0, 2^bits). Symmetric quantization is the special case z = 2^(bits-1). This is ORT MatMulNBits' layout, and the
compressed-tensors / GPTQ / AWQ layouts are repackings of the same (q, scale, z).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class QWeight:
    """q [N, K] uint8 codes, scale [N, G] float32, zero [N, G] uint8 (G = K / group). zero_f [N, G] float32, when
    set, is the exact (fractional) zero point and `zero` its rounding: weights that already sit on a 4-bit grid with
    a float offset (GGUF Q4_1: w = d*q + m) are then represented exactly (see grid.py)."""

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group: int
    zero_f: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)  # type: ignore[return-value]

    def dequantize(self) -> torch.Tensor:
        """[N, K] float32."""
        n, k = self.q.shape
        q = self.q.view(n, k // self.group, self.group).float()
        zero = self.zero.float() if self.zero_f is None else self.zero_f
        w = (q - zero[..., None]) * self.scale[..., None]
        return w.reshape(n, k)


def check_group(k: int, group: int, name: str = "weight") -> None:
    if group < 1 or k % group:
        raise ValueError(f"{name}: group size {group} does not divide the input dimension {k}")


def quantize_groups(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes q [N, K] uint8 of w [N, K] for given scale/zero [N, G] (round to nearest, clamped to the grid)."""
    n, k = w.shape
    g = scale.shape[1]
    x = w.float().view(n, g, k // g) / scale[..., None] + zero.float()[..., None]
    return x.round().clamp(0, 2**bits - 1).to(torch.uint8).view(n, k)


def minmax_params(w: torch.Tensor, bits: int, group: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest scale [N, G] float32 and zero [N, G] uint8 from each group's range."""
    n, k = w.shape
    check_group(k, group)
    x = w.float().view(n, k // group, group)
    top = 2**bits - 1
    if symmetric:
        half = 2 ** (bits - 1)
        scale = x.abs().amax(-1) / (half - 1 if bits == 8 else half - 0.5)
        scale = scale.clamp(min=1e-10)
        zero = torch.full_like(scale, half, dtype=torch.uint8)
        return scale, zero
    lo, hi = x.amin(-1).clamp(max=0), x.amax(-1).clamp(min=0)  # the range includes 0, so 0 is exact
    scale = ((hi - lo) / top).clamp(min=1e-10)
    zero = (-lo / scale).round().clamp(0, top).to(torch.uint8)
    return scale, zero


def rtn(w: torch.Tensor, bits: int, group: int, symmetric: bool = False) -> QWeight:
    """Round-to-nearest quantization of w [N, K]; group == K means per output channel."""
    scale, zero = minmax_params(w, bits, group, symmetric)
    return QWeight(quantize_groups(w, scale, zero, bits), scale, zero, bits, group)


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """[..., 2M] uint8 values < 16 -> [..., M] bytes, element 2i in the low nibble (ORT's order)."""
    codes = codes.astype(np.uint8)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    out = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), dtype=np.uint8)
    out[..., 0::2], out[..., 1::2] = packed & 0x0F, packed >> 4
    return out
