"""Weight-only quantization of FFN weights: FP8 (e4m3) or INT8, symmetric, one scale per output channel, or per
(output channel, 128-column block) for DeepSeek-style block-scaled FP8 checkpoints.

    w [..., N, K] float -> q [..., N, K] int8 / float8_e4m3fn, scale [..., N, G] float32, w ~= q * scale
    G = 1: per channel (scale = max|w row| / qmax); G = ceil(K / block_k): column k uses scale[..., k // block_k]

What is quantized: the routed experts (ExpertBank); in a model without routed experts, the dense FFN (GatedMLP
layers), so that a dense checkpoint can be served and measured the same way. Attention, router gates, shared experts,
embeddings and the LM head stay in the compute dtype.

On CUDA the fused Triton kernels (gpu/moe_kernels.py) read q and scale and dequantize in registers (half the weight
bytes of bf16); the torch paths (the CPU reference) dequantize on the fly with `QuantTensor.dequantize`: the same
values, so perplexity measured on the CPU is the quality the GPU serves (up to the compute dtype's rounding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

QUANTIZATIONS = ("none", "fp8", "int8")
STORAGE = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}
QMAX = {"fp8": 448.0, "int8": 127.0}  # largest finite e4m3 value; int8 symmetric keeps -128 unused


def check_quantization(value: str, field: str = "quantization") -> str:
    if value not in QUANTIZATIONS:
        raise ValueError(f"{field} must be one of {list(QUANTIZATIONS)}, got {value!r}")
    return value


@dataclass
class QuantTensor:
    """Quantized weight: q [..., N, K] (int8 or float8_e4m3fn), scale [..., N, G] float32 (see the module doc)."""

    q: torch.Tensor
    scale: torch.Tensor
    block_k: int  # columns per scale (K for per-channel)

    @property
    def scheme(self) -> str:
        return "int8" if self.q.dtype == torch.int8 else "fp8"

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    @property
    def per_channel(self) -> bool:
        return self.scale.shape[-1] == 1

    @property
    def nbytes(self) -> int:
        return self.q.numel() * self.q.element_size() + self.scale.numel() * self.scale.element_size()

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """[..., N, K] in dtype: q * scale (float32 product, one rounding)."""
        k = self.q.shape[-1]
        scale = self.scale if self.per_channel else self.scale.repeat_interleave(self.block_k, -1)[..., :k]
        return (self.q.float() * scale).to(dtype)

    def __getitem__(self, index) -> QuantTensor:
        """Leading-dimension slice (one expert of a stack)."""
        return QuantTensor(self.q[index], self.scale[index], self.block_k)


def quantize(w: torch.Tensor, scheme: str, block_k: int | None = None) -> QuantTensor:
    """w [..., N, K] -> QuantTensor; block_k None: one scale per output channel, else per block_k columns.
    Computed on w's device in float32 (a GPU quantizes a layer stack in milliseconds)."""
    check_quantization(scheme)
    if scheme == "none":
        raise ValueError("quantize() needs scheme 'fp8' or 'int8'")
    k = w.shape[-1]
    block_k = block_k or k
    groups = -(-k // block_k)
    w32 = w.float()
    padded = F.pad(w32, (0, groups * block_k - k)).unflatten(-1, (groups, block_k))  # [..., N, G, block_k]
    scale = padded.abs().amax(-1).clamp(min=1e-12) / QMAX[scheme]  # [..., N, G]
    full = scale if groups == 1 else scale.repeat_interleave(block_k, -1)[..., :k]
    x = w32 / full
    q = x.round().clamp(-127, 127).to(torch.int8) if scheme == "int8" else x.clamp(-448, 448).to(STORAGE[scheme])
    return QuantTensor(q.contiguous(), scale.contiguous(), block_k)


def from_block_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> QuantTensor:
    """A DeepSeek FP8 checkpoint tensor as stored: weight [N, K] e4m3, scale_inv [ceil(N/bn), ceil(K/bk)] ->
    QuantTensor with the block scale repeated over the block's bn rows (scale [N, ceil(K/bk)]): served in FP8."""
    n = weight.shape[0]
    scale = scale_inv.float().repeat_interleave(block[0], 0)[:n]  # [N, G]
    return QuantTensor(weight.to(torch.float8_e4m3fn).contiguous(), scale.contiguous(), block[1])


def stack(parts: list[QuantTensor]) -> QuantTensor:
    """Per-expert QuantTensors (same scheme and block_k) -> one [E, N, K] stack."""
    return QuantTensor(torch.stack([p.q for p in parts]), torch.stack([p.scale for p in parts]), parts[0].block_k)


class QuantLinear(nn.Module):
    """Linear over a QuantTensor weight [out, in]: dequantized on the fly (the reference path; dense FFNs only)."""

    def __init__(self, weight: QuantTensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("q", weight.q)
        self.register_buffer("scale", weight.scale)
        self.block_k = weight.block_k
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = QuantTensor(self.q, self.scale, self.block_k).dequantize(x.dtype)  # [out, in]
        return F.linear(x, w, self.bias)


def quantize_dense_ffn(backbone: nn.Module, scheme: str) -> int:
    """Replace the projections of every dense FFN (GatedMLP layer, not shared experts) by QuantLinear; returns how
    many layers were quantized."""
    from moemesh.runtime.layers import GatedMLP

    if scheme == "none":
        return 0
    count = 0
    for layer in backbone.layers:
        if isinstance(layer.mlp, GatedMLP):
            for name in ("gate_proj", "up_proj", "down_proj"):
                linear = getattr(layer.mlp, name)
                setattr(layer.mlp, name, QuantLinear(quantize(linear.weight.data, scheme), linear.bias))
            count += 1
    return count
