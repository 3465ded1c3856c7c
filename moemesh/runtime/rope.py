"""Rotary position embedding: inverse frequencies (default, linear, llama3, yarn scaling) and their application.

Each token carries its own absolute position, so one table serves a ragged batch of sequences at different offsets.
Matches transformers' formulas (modeling_rope_utils) so logits agree to float32 rounding.
"""

from __future__ import annotations

import math

import torch

from moemesh.runtime.spec import RopeSpec


def _yarn(spec: RopeSpec) -> tuple[torch.Tensor, float]:
    p, dim, base = spec.scaling, spec.dim, spec.theta
    original = p["original_max_position_embeddings"]
    factor = p.get("factor") or spec.max_position_embeddings / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        m, m_all = p.get("mscale"), p.get("mscale_all_dim")
        attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolation = 1 - ramp  # 1: keep the original frequency, 0: interpolate (divide by factor)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def _llama3(spec: RopeSpec, inv_freq: torch.Tensor) -> torch.Tensor:
    p = spec.scaling
    factor, low_f, high_f = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low_f, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low_f) / (high_f - low_f)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high_f) * ~(wavelen > old_len / low_f)
    return torch.where(medium, smoothed, scaled)


def inverse_frequencies(spec: RopeSpec) -> tuple[torch.Tensor, float]:
    """([dim / 2] float32 inverse frequencies, attention factor that scales cos and sin)."""
    kind = spec.scaling["rope_type"]
    if kind == "yarn":
        return _yarn(spec)
    exponents = torch.arange(0, spec.dim, 2, dtype=torch.int64).to(torch.float32) / spec.dim
    inv_freq = 1.0 / (spec.theta**exponents)
    if kind == "linear":
        inv_freq = inv_freq / spec.scaling["factor"]
    elif kind == "llama3":
        inv_freq = _llama3(spec, inv_freq)
    return inv_freq, 1.0


class Rotary:
    """cos/sin for a step's token positions, applied to [T, heads, dim] tensors."""

    def __init__(self, spec: RopeSpec, device: torch.device | str) -> None:
        inv_freq, self.attention_factor = inverse_frequencies(spec)
        self.inv_freq = inv_freq.to(device)
        self.interleaved = spec.interleaved

    def table(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [T] int64 -> (cos, sin), each [T, 1, dim] in dtype (broadcast over heads)."""
        freqs = positions[:, None].float() * self.inv_freq[None, :]  # [T, dim/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, dim]
        cos = (emb.cos() * self.attention_factor).to(dtype)
        sin = (emb.sin() * self.attention_factor).to(dtype)
        return cos[:, None, :], sin[:, None, :]

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [T, heads, dim]. Interleaved layouts come out de-interleaved (evens then odds): q and k both get the
        same permutation, so their dot products, all attention uses them for, are unchanged."""
        if self.interleaved:
            half = x.shape[-1] // 2
            c, s = cos[..., :half], sin[..., :half]
            x1, x2 = x[..., 0::2], x[..., 1::2]
            return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin
