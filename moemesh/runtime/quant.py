"""Weight-only quantization of FFN weights: FP8 (e4m3) or INT8, symmetric, one scale per output channel, or per
(output channel, 128-column block) for DeepSeek-style block-scaled FP8 checkpoints; INT4, two values per byte, a
scale per (output channel, group of 128 columns; 32 or 64 from checkpoints) and optionally zero points.

    w [..., N, K] float -> q [..., N, K] int8 / float8_e4m3fn, scale [..., N, G] float32, w ~= q * scale
    G = 1: per channel (scale = max|w row| / qmax); G = ceil(K / block_k): column k uses scale[..., k // block_k]
    int4: q [..., N, B * 64] uint8, B = ceil(K / 128) packing blocks (K zero-padded to whole blocks); byte j of
          block b holds column 128b + j in its low nibble and 128b + 64 + j in its high nibble (pack_int4), as a
          code in [0, 16); scale [..., N, B * 128 / block_k], block_k in INT4_GROUPS; w ~= (code - zero) * scale
          with zero = 8 (symmetric; quantize() uses codes 1..15) or the zero [..., N, G] float32 of the group
          (asymmetric checkpoints: GPTQ / AWQ / compressed-tensors codes are kept as they are, int4_from_qweight).

Why that packing (along K, split halves within a 128-column block, not adjacent columns per byte as in GPTQ, AWQ
and vLLM): the kernels load each row's bytes contiguously along K (coalesced, vectorised like the bf16 tiles, every
byte read once: vLLM's w4a16 kernel instead loads byte k // 2 once per column k), and the low and high nibbles of a
tile are then two contiguous 64-column halves of the block: two dots of K = 64 (or two row sums) against the
matching halves of the activations, with no interleave of nibbles across lanes, and each group's scale applied once
to its sum.

What is quantized: the routed experts (ExpertBank); in a model without routed experts, the dense FFN (GatedMLP
layers), so that a dense checkpoint can be served and measured the same way. Attention, router gates, shared experts,
embeddings and the LM head stay in the compute dtype. (Measured on the H200 and dropped, 2026-11-30: int4 attention
projections as AWQ / GPTQ checkpoints carry them, q/k/v/o on the dp4a GEMV at 1-2 rows and dequantized + cuBLAS
beyond; Qwen3-30B-A3B shape, int4 experts, graph replay ms per step: batch 1 1.95 -> 1.90, batch 8 4.22 -> 6.57,
batch 64 10.49 -> 12.99. Alone the GEMVs save 4 us per layer (benchmarks/h200/dense_int4.py), in the step 1: the
bf16 GEMVs already load their weights before the PDL wait, overlapping the kernel before. Measured again and
dropped the same day, branch int4-attention-prefetch: a dense int4 GEMV loading its codes before the PDL wait too,
float activations, the norm folded in: batch 1 1.88 -> 2.08 ms, batch 8 4.04 -> 10.40; its work after the wait
outlasts bf16's whole GEMV. benchmarks/results/step-ablation-h200.md.)

On CUDA the fused Triton kernels (gpu/moe_kernels.py) read q and scale and dequantize in registers (half the weight
bytes of bf16; int4 about a quarter); the torch paths (the CPU reference) dequantize on the fly with
`QuantTensor.dequantize`: the same values, so perplexity measured on the CPU is the quality the GPU serves (up to
the compute dtype's rounding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

QUANTIZATIONS = ("none", "fp8", "int8", "int4")
INT4_BLOCK = 128  # int4 packing block (pack_int4): the kernels step K one block at a time
INT4_GROUP = 128  # int4 columns per scale of quantize() (checkpoints may bring any of INT4_GROUPS)
INT4_GROUPS = (32, 64, 128)  # scale group sizes the int4 kernels take (a piece of W = min(group, 64) columns)
STORAGE = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}
QMAX = {"fp8": 448.0, "int8": 127.0}  # largest finite e4m3 value; int8 symmetric keeps -128 unused
# fp8 rule for dense FFNs (quantize_dense_ffn): FP8_BLOCK_K-column block scales (DeepSeek's layout; the GPU kernels
# take it as GROUP_K). Why (SmolLM2, benchmarks/quant_quality.py): e4m3 keeps 3 mantissa bits, so every weight gets
# ~2.6% relative error whatever its scale (the same in all 30 layers; no subnormals, outliers or scale problem), and
# blocks lower it only to 2.56%. Yet perplexity moved from +1.37% (per channel) to +0.44% (blocks) on wikitext-2,
# +3.45% -> +0.28% on benchmarks/data/heldout_us_founding.txt, +0.84% -> +0.62% on calibration text: the loss is
# not the average error but how some weights round (which ones is not pinned down: not the rows' outliers, not the
# RMSNorm-weighted input channels, not correlated rounding). Keeping the most sensitive layers (0 and 2 on
# calibration text) unquantized did not help on held-out text (+0.48%). Routed experts still get one scale per
# channel (experts.py; smollm2-moe +0.25%, with 128-column blocks -0.14%): the GPU fp8 figures were measured so.
FP8_BLOCK_K = 128


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
    cols: int = 0  # int4: K, the unpadded columns (q holds whole blocks); 0 for int8/fp8 (K = q.shape[-1])
    zero: torch.Tensor | None = None  # int4 only: [..., N, G] float32 zero points in code units (None: 8, symmetric)

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
        zero = 0 if self.zero is None else self.zero.numel() * self.zero.element_size()
        return self.q.numel() * self.q.element_size() + self.scale.numel() * self.scale.element_size() + zero

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """[..., N, K] in dtype: q * scale (float32 product, one rounding)."""
        if self.cols:  # int4: (code - zero) * scale per group of block_k columns, padding columns dropped
            codes = unpack_int4(self.q).flatten(-2).float()  # [..., N, padded K]
            zero = 8.0 if self.zero is None else self.zero.repeat_interleave(self.block_k, -1)
            return ((codes - zero) * self.scale.repeat_interleave(self.block_k, -1))[..., :self.cols].to(dtype)
        k = self.q.shape[-1]
        scale = self.scale if self.per_channel else self.scale.repeat_interleave(self.block_k, -1)[..., :k]
        return (self.q.float() * scale).to(dtype)

    def to(self, device: torch.device | str) -> QuantTensor:
        zero = None if self.zero is None else self.zero.to(device)
        return QuantTensor(self.q.to(device), self.scale.to(device), self.block_k, self.cols, zero)

    def __getitem__(self, index) -> QuantTensor:
        """Leading-dimension slice (one expert of a stack)."""
        zero = None if self.zero is None else self.zero[index]
        return QuantTensor(self.q[index], self.scale[index], self.block_k, self.cols, zero)


def quantize(w: torch.Tensor, scheme: str, block_k: int | None = None) -> QuantTensor:
    """w [..., N, K] -> QuantTensor; block_k None: one scale per output channel, else per block_k columns.
    Computed on w's device in float32 (a GPU quantizes a layer stack in milliseconds)."""
    check_quantization(scheme)
    if scheme == "none":
        raise ValueError("quantize() needs scheme 'fp8', 'int8' or 'int4'")
    if scheme == "int4":
        if block_k not in (None, *INT4_GROUPS):
            raise ValueError(f"int4 block_k must be one of {list(INT4_GROUPS)} (the kernels' groups), got {block_k}")
        return quantize_int4(w, block_k or INT4_GROUP)
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
    zeros = _zeros(parts)
    return QuantTensor(torch.stack([p.q for p in parts]), torch.stack([p.scale for p in parts]), parts[0].block_k,
                       parts[0].cols, None if zeros is None else torch.stack(zeros))


def concat_rows(parts: list[QuantTensor]) -> QuantTensor:
    """[N_i, K] QuantTensors of one scheme and scale layout -> [sum N_i, K] (gate and up -> gate_up)."""
    if len({(p.block_k, p.cols, p.scale.shape[-1]) for p in parts}) > 1:
        raise ValueError(f"cannot concatenate quantized rows of different scale layouts "
                         f"{[(p.block_k, p.cols) for p in parts]}")
    zeros = _zeros(parts)
    return QuantTensor(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]), parts[0].block_k,
                       parts[0].cols, None if zeros is None else torch.cat(zeros))


def _zeros(parts: list[QuantTensor]) -> list[torch.Tensor] | None:
    """int4 zero points of the parts, 8 (explicit) for the symmetric ones; None when all are symmetric."""
    if all(p.zero is None for p in parts):
        return None
    return [p.zero if p.zero is not None else torch.full_like(p.scale, 8.0) for p in parts]


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """codes [..., B, 128] uint8 in [0, 16) -> [..., B * 64] uint8: byte j of block b = code j | code 64 + j << 4."""
    half = INT4_BLOCK // 2
    return (codes[..., :half] | (codes[..., half:] << 4)).flatten(-2)


def unpack_int4(q: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4: q [..., B * 64] uint8 -> codes [..., B, 128] uint8."""
    blocks = q.unflatten(-1, (-1, INT4_BLOCK // 2))  # [..., B, 64]
    return torch.cat((blocks & 15, blocks >> 4), -1)


def quantize_int4(w: torch.Tensor, group: int = INT4_GROUP, symmetric: bool = True) -> QuantTensor:
    """w [..., N, K] -> int4 QuantTensor, round to nearest per group of columns (in INT4_GROUPS): symmetric, scale =
    max |w| / 7 (codes 1..15); else scale = (max - min) / 15 over a range that includes 0, with float zero points
    (a zero group gets a tiny scale). K is zero-padded to whole 128-column blocks. Float32 on w's device."""
    k = w.shape[-1]
    blocks = -(-k // INT4_BLOCK)
    padded = F.pad(w.float(), (0, blocks * INT4_BLOCK - k)).unflatten(-1, (-1, group))  # [..., N, G, group]
    if symmetric:
        scale, zero = padded.abs().amax(-1).clamp(min=1e-12) / 7, None  # [..., N, G]
        codes = (padded / scale[..., None]).round().clamp(-8, 7) + 8
    else:
        lo, hi = padded.amin(-1).clamp(max=0), padded.amax(-1).clamp(min=0)
        scale = ((hi - lo) / 15).clamp(min=1e-12)
        zero = (-lo / scale).round().clamp(0, 15)  # [..., N, G] code of 0.0
        codes = (padded / scale[..., None] + zero[..., None]).round().clamp(0, 15)
    codes = codes.to(torch.uint8).flatten(-2).unflatten(-1, (blocks, INT4_BLOCK))  # [..., N, B, 128]
    return QuantTensor(pack_int4(codes).contiguous(), scale.contiguous(), group, k,
                       None if zero is None else zero.contiguous())


def int4_from_qweight(qw, name: str = "weight") -> QuantTensor:
    """A checkpoint's int4 weight as read (moemesh.quant.packing.QWeight of compressed-tensors / GPTQ / AWQ: codes
    q [N, K] uint8 in [0, 16), scale and zero [N, K / group]; w = (q - zero) * scale) -> the kernels' layout with
    the same codes, scales and zero points (no second rounding; symmetric when every zero is 8). ValueError naming
    the tensor and the field when the kernels cannot take it (the caller then re-quantizes the dequantized weight)."""
    k = qw.q.shape[1]
    if qw.bits != 4:
        raise ValueError(f"{name}: num_bits {qw.bits}, not 4")
    if qw.group not in INT4_GROUPS or k % qw.group:
        raise ValueError(f"{name}: group_size {qw.group} (K {k}), the int4 kernels take {list(INT4_GROUPS)}")
    blocks = -(-k // INT4_BLOCK)
    groups = blocks * INT4_BLOCK // qw.group  # scale groups of the padded row
    codes = F.pad(qw.q, (0, blocks * INT4_BLOCK - k), value=8).unflatten(-1, (blocks, INT4_BLOCK))  # [N, B, 128]
    scale = F.pad(qw.scale.float(), (0, groups - qw.scale.shape[1]))  # padding groups: scale 0
    zero = None
    if qw.zero_f is not None or not bool((qw.zero == 8).all()):
        stored = qw.zero_f if qw.zero_f is not None else qw.zero
        zero = F.pad(stored.float(), (0, groups - stored.shape[1]), value=8.0).contiguous()
    return QuantTensor(pack_int4(codes.to(torch.uint8)).contiguous(), scale.contiguous(), qw.group, k, zero)


class QuantLinear(nn.Module):
    """Linear over a QuantTensor weight [out, in]: dequantized on the fly (the reference path; dense FFNs only)."""

    def __init__(self, weight: QuantTensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("q", weight.q)
        self.register_buffer("scale", weight.scale)
        self.register_buffer("zero", weight.zero)  # int4 zero points, or None
        self.block_k, self.cols = weight.block_k, weight.cols
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = QuantTensor(self.q, self.scale, self.block_k, self.cols, self.zero).dequantize(x.dtype)  # [out, in]
        return F.linear(x, w, self.bias)


def quantize_dense_ffn(backbone: nn.Module, scheme: str) -> int:
    """Replace the projections of every dense FFN (GatedMLP layer, not shared experts) by QuantLinear; returns how
    many layers were quantized. fp8 gets FP8_BLOCK_K-column block scales (see FP8_BLOCK_K), int8 one per channel."""
    from moemesh.runtime.layers import GatedMLP

    if scheme == "none":
        return 0
    count = 0
    block_k = FP8_BLOCK_K if scheme == "fp8" else None
    for layer in backbone.layers:
        if isinstance(layer.mlp, GatedMLP):
            for name in ("gate_proj", "up_proj", "down_proj"):
                linear = getattr(layer.mlp, name)
                setattr(layer.mlp, name, QuantLinear(quantize(linear.weight.data, scheme, block_k), linear.bias))
            count += 1
    return count
