"""Weight-only int8 / int4 matmuls on the CPU through torch's own packed kernels (`--backend packed`).

    w [N, K] float        -> int8: q [N, K] int8, scale [N]                 w ~= q * scale (one scale a row)
    codes [N, K] in 0..15 -> int4: torch's packed nibbles [N, K / 2] and scale_zero [K / G, N, 2] (bf16):
    + scale, zero [N, G]            w ~= (code - 8) * s + z per G columns, z = (8 - zero) * s: the checkpoint's codes,
                                    or a float weight's own where it lies on a 4-bit grid (grid_codes: GGUF-born)
    x [T, K] any float -> bf16 -> torch._weight_int8pack_mm / torch._weight_int4pack_mm_for_cpu -> [T, N] in x's dtype

Why: at batch 1 a CPU decode step reads every weight once. In float32 the built-in smollm2-moe (134.5M parameters,
538 MB) is memory-bound: aten::mm took 29 of 51 ms a step on 2 cores (torch profiler, 2026-11-30). These kernels
read 1 (int8) or 1/2 (int4) byte a weight and multiply in bf16 (AVX-512 BF16 where the CPU has it) with float32
sums. The activations are rounded to bf16 (8 significant bits) at each matmul, not to int8 per 32 columns as ONNX
Runtime's fast MatMulNBits path does (its accuracy level 4): that rounding flips the README's near-tie France answer
on this model (first token "The" -1.88 vs "L" -1.97 in float32), bf16 keeps it (packed int8: "The" -1.38, "L" -2.01).
ORT's float-activation levels (0-3) were 6x slower than level 4 on this CPU.

Shapes the kernels take (else `pack` returns None and the caller keeps its float weight): int8 K % 16 == 0 (torch
2.13's int8 kernel crashes on K = 8, 24, 40), int4 N % 16 == 0 and a group of 32..256 columns dividing K.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moemesh.quant.grid import on_grid
from moemesh.runtime.quant import QuantTensor, unpack_int4

SCHEMES = ("int8", "int4")
_INT4_GROUPS = (256, 128, 64, 32)  # groups torch's int4 CPU kernel takes, largest first


@dataclass(frozen=True)
class Codes:
    """Integer weights as a checkpoint or QuantTensor holds them: w = (codes - zero) * scale per `group` columns.
    codes [N, K] integers (int8: signed, zero 0; int4: 0..15), scale / zero [N, ceil(K / group)] float32."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group: int

    def dequantize(self) -> torch.Tensor:
        """[N, K] float32."""
        k = self.codes.shape[1]
        zero, scale = (t.repeat_interleave(self.group, 1)[:, :k] for t in (self.zero, self.scale))
        return (self.codes.float() - zero) * scale

    def regroup(self, group: int) -> Codes:
        """The same weights with scales per `group` columns (group divides self.group and K)."""
        per, k = self.group // group, self.codes.shape[1]
        scale, zero = (t.repeat_interleave(per, 1)[:, :k // group] for t in (self.scale, self.zero))
        return Codes(self.codes, scale, zero, self.bits, group)


def concat(parts: list[Codes], dim: int) -> Codes | None:
    """Codes side by side: dim 0 stacks rows, dim 1 joins columns (each part regrouped to a group that divides
    every part's columns). None when no int4 group fits the parts' columns."""
    if dim == 1:
        group = next((g for g in _INT4_GROUPS if all(p.group % g == 0 and p.codes.shape[1] % g == 0 for p in parts)),
                     0)
        if not group:
            return None
        parts = [p.regroup(group) for p in parts]
    elif len({p.group for p in parts}) > 1:
        return None
    return Codes(*(torch.cat([getattr(p, f) for p in parts], dim) for f in ("codes", "scale", "zero")),
                 parts[0].bits, parts[0].group)


class PackedWeight:
    """One [N, K] weight in a packed kernel's layout; calling it multiplies x [..., K] by its transpose."""

    def __init__(self, scheme: str, data: torch.Tensor, scale: torch.Tensor, group: int, shape: tuple[int, int]):
        self.scheme, self.data, self.scale, self.group, self.shape = scheme, data, scale, group, shape

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scale.numel() * self.scale.element_size()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> [..., N] in x's dtype (computed in bf16 with float32 sums)."""
        flat = (x if x.dim() == 2 else x.reshape(-1, x.shape[-1])).to(torch.bfloat16)  # [T, K]
        if self.scheme == "int8":
            y = torch._weight_int8pack_mm(flat, self.data, self.scale)
        else:
            y = torch._weight_int4pack_mm_for_cpu(flat, self.data, self.group, self.scale)
        y = y.to(x.dtype)  # [T, N]
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.shape[0])  # [..., N] (a decode step: ~4k calls)


def pack_int8(w: torch.Tensor) -> PackedWeight | None:
    """Round-to-nearest int8, one scale per output row (symmetric), from a float weight [N, K]."""
    n, k = w.shape
    if k % 16:
        return None
    w32 = w.detach().float()
    scale = w32.abs().amax(1).clamp(min=1e-12) / 127  # [N]
    q = (w32 / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
    return PackedWeight("int8", q.contiguous(), scale.to(torch.bfloat16), k, (n, k))


def pack_int4(c: Codes) -> PackedWeight | None:
    """A checkpoint's int4 codes as they are (no second rounding; scales and offsets rounded to bf16)."""
    n, k = c.codes.shape
    group = next((g for g in _INT4_GROUPS if g <= c.group and c.group % g == 0 and k % g == 0), 0)
    if c.bits != 4 or n % 16 or not group:
        return None
    per = c.group // group  # torch groups per checkpoint group
    scale, zero = (t.repeat_interleave(per, 1)[:, :k // group] for t in (c.scale, c.zero))  # [N, K / group]
    offset = (8.0 - zero) * scale  # w = (code - 8) * s + offset
    scale_zero = torch.stack((scale.t(), offset.t()), -1).to(torch.bfloat16).contiguous()  # [K / group, N, 2]
    data = torch._convert_weight_to_int4pack_for_cpu(c.codes.to(torch.int32).contiguous(), 1)  # [N, K / 2] uint8
    return PackedWeight("int4", data, scale_zero, group, (n, k))


def pack(w: torch.Tensor | QuantTensor | Codes) -> PackedWeight | None:
    """The packed form of a weight [N, K]: int4 codes stay int4, and so does a float weight that lies on a 4-bit
    grid (grid_codes); everything else becomes int8 per row (other float weights, int8 or fp8 QuantTensors, int8
    codes: rounded once more from their float values). None when the kernels cannot take the shape (module doc)."""
    if isinstance(w, QuantTensor):
        w = codes_of(w) if w.scheme == "int4" else w.dequantize(torch.float32)
    if isinstance(w, torch.Tensor):
        w = grid_codes(w) or w
    if isinstance(w, Codes):
        packed = pack_int4(w) if w.bits == 4 else None
        return packed or pack_int8(w.dequantize())
    return pack_int8(w)


GRID_GROUP = 32  # GGUF's Q4_0 / Q4_1 blocks


def grid_codes(w: torch.Tensor, group: int = GRID_GROUP) -> Codes | None:
    """The exact int4 codes of a float weight [N, K] whose every `group` columns are 16 evenly spaced levels from
    their min to their max (w = lo + code * (hi - lo) / 15), as a GGUF Q4_1 weight dequantized is: the built-in
    model's attention and gate / up projections (quant/grid.py's test, its widest grid only). None when any group is
    off that grid (then a second rounding to int8 is all the packed kernels can do). Exact codes keep the
    checkpoint's values up to bf16 scales and offsets (~1e-3 of a step), closer than int8 per row, and read half the
    bytes."""
    qw = on_grid(w, 4, group)
    return None if qw is None else Codes(qw.q, qw.scale, qw.zero_f, 4, group)


def summary(weights) -> str:
    """What Router.Info says of a float checkpoint on the packed kernels: "int8", or "int4 grid + int8" (or "int4
    grid") where weights on a 4-bit grid kept their exact codes (grid_codes)."""
    schemes = {w.scheme for w in weights if isinstance(w, PackedWeight)}
    return " + ".join(["int4 grid"] * ("int4" in schemes) + ["int8"] * ("int8" in schemes or not schemes))


def codes_of(t: QuantTensor) -> Codes:
    """An int4 QuantTensor [N, K] (quant.py's block layout) as plain codes [N, K] with their scales and zeros."""
    k = t.shape[1]
    codes = unpack_int4(t.q).flatten(-2)[:, :k]  # [N, K] uint8 (the padding columns of the last block dropped)
    groups = -(-k // t.block_k)
    zero = torch.full_like(t.scale, 8.0) if t.zero is None else t.zero.float()
    return Codes(codes, t.scale[:, :groups].float(), zero[:, :groups], 4, t.block_k)


def matmul(x: torch.Tensor, w: PackedWeight | torch.Tensor) -> torch.Tensor:
    """x [..., K] @ w^T for a packed or float weight [N, K]."""
    return w(x) if isinstance(w, PackedWeight) else x @ w.T  # x @ w.T: the torch path's exact arithmetic
