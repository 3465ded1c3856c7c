"""Weight-only quantization of FFN weights: FP8 (e4m3) or INT8, symmetric, one scale per output channel, or per
(output channel, 128-column block) for DeepSeek-style block-scaled FP8 checkpoints; INT4, symmetric, per
(output channel, 128-column group), two values per byte.

    w [..., N, K] float -> q [..., N, K] int8 / float8_e4m3fn, scale [..., N, G] float32, w ~= q * scale
    G = 1: per channel (scale = max|w row| / qmax); G = ceil(K / block_k): column k uses scale[..., k // block_k]
    int4: q [..., N, G * 64] uint8, G = ceil(K / 128) (K zero-padded to whole groups), scale [..., N, G];
          byte j of group g holds column 128g + j in its low nibble and 128g + 64 + j in its high nibble, as
          code = value + 8 (value in [-8, 7], RTN uses [-7, 7]); w ~= (code - 8) * scale (pack_int4).

Why that packing (along K, split halves within a group, not adjacent columns per byte as in GPTQ/AWQ/vLLM): the
kernels load each row's bytes contiguously along K (coalesced, vectorised like the bf16 tiles, every byte read
once: vLLM's w4a16 kernel instead loads byte k // 2 once per column k), and the low and high nibbles of a tile are
then two contiguous 64-column halves of the group: two dots of K = 64 (or two row sums) against the matching halves
of the activations, with no interleave of nibbles across lanes, and the group's scale applied once to the sum.

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

QUANTIZATIONS = ("none", "fp8", "int8", "int4")
INT4_GROUP = 128  # int4: columns per scale = the packing group (pack_int4); the kernels step K one group at a time
STORAGE = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}
QMAX = {"fp8": 448.0, "int8": 127.0}  # largest finite e4m3 value; int8 symmetric keeps -128 unused
# fp8 rule for dense FFNs (quantize_dense_ffn). e4m3 keeps 3 mantissa bits: every weight gets ~2.6% relative error
# whatever its scale (measured on SmolLM2: the same in all 30 layers, no subnormals, outliers or scale problem), so
# the loss depends on where the model is sensitive, not on the weights. On calibration text (quant/data/calib_en.txt)
# the FFNs of layers 0 and 2 cost about as much as all other layers together (layer 2 writes the massive
# activations later layers key on); 128-column block scales shave a little more. Hence: the first
# FP8_DENSE_KEEP_FIRST layers stay in the compute dtype (3 of 30 layers: +10% of the FFN bytes of an fp8 model),
# the rest use FP8_BLOCK_K-column block scales (DeepSeek's layout; the GPU kernels take it as GROUP_K).
FP8_BLOCK_K = 128
FP8_DENSE_KEEP_FIRST = 3


def check_quantization(value: str, field: str = "quantization") -> str:
    if value not in QUANTIZATIONS:
        raise ValueError(f"{field} must be one of {list(QUANTIZATIONS)}, got {value!r}")
    return value


@dataclass
class QuantTensor:
    """Quantized weight: q [..., N, K] (int8 or float8_e4m3fn) or [..., N, G * 64] (uint8, int4 packed),
    scale [..., N, G] float32 (see the module doc)."""

    q: torch.Tensor
    scale: torch.Tensor
    block_k: int  # columns per scale (K for per-channel)
    cols: int = 0  # int4: K, the unpadded columns (q holds whole groups); 0 for int8/fp8 (K = q.shape[-1])

    @property
    def scheme(self) -> str:
        return {torch.int8: "int8", torch.uint8: "int4"}.get(self.q.dtype, "fp8")

    @property
    def shape(self) -> torch.Size:
        return self.q.shape[:-1] + (self.cols,) if self.cols else self.q.shape

    @property
    def per_channel(self) -> bool:
        return self.scale.shape[-1] == 1 and not self.cols

    @property
    def nbytes(self) -> int:
        return self.q.numel() * self.q.element_size() + self.scale.numel() * self.scale.element_size()

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """[..., N, K] in dtype: q * scale (float32 product, one rounding)."""
        if self.cols:  # int4: [..., N, G, 128] values times their group's scale, padding columns dropped
            values = unpack_int4(self.q).float() - 8
            return (values * self.scale[..., None]).flatten(-2)[..., :self.cols].to(dtype)
        k = self.q.shape[-1]
        scale = self.scale if self.per_channel else self.scale.repeat_interleave(self.block_k, -1)[..., :k]
        return (self.q.float() * scale).to(dtype)

    def __getitem__(self, index) -> QuantTensor:
        """Leading-dimension slice (one expert of a stack)."""
        return QuantTensor(self.q[index], self.scale[index], self.block_k, self.cols)


def quantize(w: torch.Tensor, scheme: str, block_k: int | None = None) -> QuantTensor:
    """w [..., N, K] -> QuantTensor; block_k None: one scale per output channel, else per block_k columns.
    Computed on w's device in float32 (a GPU quantizes a layer stack in milliseconds)."""
    check_quantization(scheme)
    if scheme == "none":
        raise ValueError("quantize() needs scheme 'fp8', 'int8' or 'int4'")
    if scheme == "int4":
        if block_k not in (None, INT4_GROUP):
            raise ValueError(f"int4 block_k must be {INT4_GROUP} (the kernels' group), got {block_k}")
        return quantize_int4(w)
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
    return QuantTensor(torch.stack([p.q for p in parts]), torch.stack([p.scale for p in parts]), parts[0].block_k,
                       parts[0].cols)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """codes [..., G, 128] uint8 in [0, 16) -> [..., G * 64] uint8: byte j of group g = code j | code 64 + j << 4."""
    half = INT4_GROUP // 2
    return (codes[..., :half] | (codes[..., half:] << 4)).flatten(-2)


def unpack_int4(q: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4: q [..., G * 64] uint8 -> codes [..., G, 128] uint8."""
    grouped = q.unflatten(-1, (-1, INT4_GROUP // 2))  # [..., G, 64]
    return torch.cat((grouped & 15, grouped >> 4), -1)


def quantize_int4(w: torch.Tensor) -> QuantTensor:
    """w [..., N, K] -> int4 QuantTensor: round to nearest, symmetric, scale = max |w| of the group / 7 (a zero
    group gets a tiny scale and codes 8). Computed in float32 on w's device."""
    k = w.shape[-1]
    groups = -(-k // INT4_GROUP)
    padded = F.pad(w.float(), (0, groups * INT4_GROUP - k)).unflatten(-1, (groups, INT4_GROUP))  # [..., N, G, 128]
    scale = padded.abs().amax(-1).clamp(min=1e-12) / 7  # [..., N, G]
    codes = (padded / scale[..., None]).round().clamp(-8, 7).to(torch.int8) + 8  # [..., N, G, 128] in [1, 15]
    return QuantTensor(pack_int4(codes.to(torch.uint8)).contiguous(), scale.contiguous(), INT4_GROUP, k)


def int4_from_qweight(qw, name: str = "weight") -> QuantTensor:
    """A checkpoint's int4 weight as read (moemesh.quant.packing.QWeight of compressed-tensors / GPTQ / AWQ: codes
    q [N, K] uint8 in [0, 16), scale and zero [N, K / group]; w = (q - zero) * scale) -> the kernels' layout with
    the same codes and scales (no second rounding) when it is 4-bit, symmetric (every zero 8) with groups of 128;
    else ValueError naming the tensor and the field (the caller then re-quantizes the dequantized weight)."""
    n, k = qw.q.shape
    if qw.bits != 4:
        raise ValueError(f"{name}: num_bits {qw.bits}, not 4")
    if qw.group != INT4_GROUP:
        raise ValueError(f"{name}: group_size {qw.group}, the int4 kernels take {INT4_GROUP}")
    if qw.zero_f is not None or not bool((qw.zero == 8).all()):
        raise ValueError(f"{name}: zero_point is not 8 everywhere (asymmetric); the int4 kernels are symmetric")
    groups = -(-k // INT4_GROUP)
    codes = F.pad(qw.q, (0, groups * INT4_GROUP - k), value=8).unflatten(-1, (groups, INT4_GROUP))  # [N, G, 128]
    return QuantTensor(pack_int4(codes.to(torch.uint8)).contiguous(), qw.scale.float().contiguous(), INT4_GROUP, k)


class QuantLinear(nn.Module):
    """Linear over a QuantTensor weight [out, in]: dequantized on the fly (the reference path; dense FFNs only)."""

    def __init__(self, weight: QuantTensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("q", weight.q)
        self.register_buffer("scale", weight.scale)
        self.block_k, self.cols = weight.block_k, weight.cols
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = QuantTensor(self.q, self.scale, self.block_k, self.cols).dequantize(x.dtype)  # [out, in]
        return F.linear(x, w, self.bias)


def quantize_dense_ffn(backbone: nn.Module, scheme: str) -> int:
    """Replace the projections of every dense FFN (GatedMLP layer, not shared experts) by QuantLinear; returns how
    many layers were quantized. fp8: the first FP8_DENSE_KEEP_FIRST layers are kept, the others get FP8_BLOCK_K
    block scales (see FP8_DENSE_KEEP_FIRST)."""
    from moemesh.runtime.layers import GatedMLP

    if scheme == "none":
        return 0
    count = 0
    keep, block_k = (FP8_DENSE_KEEP_FIRST, FP8_BLOCK_K) if scheme == "fp8" else (0, None)
    for i, layer in enumerate(backbone.layers):
        if isinstance(layer.mlp, GatedMLP) and i >= keep:
            for name in ("gate_proj", "up_proj", "down_proj"):
                linear = getattr(layer.mlp, name)
                setattr(layer.mlp, name, QuantLinear(quantize(linear.weight.data, scheme, block_k), linear.bias))
            count += 1
    return count
