"""Reading the quantized checkpoint layouts users bring: compressed-tensors pack-quantized, AutoAWQ GEMM, GPTQ.

Each layout stores, per quantized Linear `<p>`, codes + scales (+ zero points) instead of `<p>.weight`.
`QuantizedLayout` maps the virtual name `<p>.weight` to those tensors and rebuilds a QWeight (packing.py's
convention: W [N, K] ~= (q - z) * scale per group of K). Anything inconsistent raises QuantConfigError naming
the tensor and the config field.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from moemesh.quant.packing import QWeight

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ GEMM: nibble i of an int32 holds column AWQ_ORDER[i] of 8
Read = Callable[[str], torch.Tensor]


class QuantConfigError(ValueError):
    """A quantization_config or quantized tensor the runtime cannot use; names the tensor and the field."""


def unpack_int32(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words -> uint8 codes, 32/bits per word along `dim`, element i at bits [i*bits, (i+1)*bits)."""
    per = 32 // bits
    p = packed.to(torch.int32).movedim(dim, -1)
    shifts = torch.arange(per, dtype=torch.int32) * bits
    codes = (p[..., None] >> shifts) & (2**bits - 1)  # [..., W, per]
    return codes.reshape(*p.shape[:-1], -1).to(torch.uint8).movedim(-1, dim)


def pack_int32(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of unpack_int32 (the length along dim padded with zeros to a multiple of 32/bits)."""
    per = 32 // bits
    c = codes.to(torch.int64).movedim(dim, -1)
    pad = (-c.shape[-1]) % per
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    c = c.reshape(*c.shape[:-1], -1, per) << (torch.arange(per) * bits)
    words = c.sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).movedim(-1, dim)


def _need(read: Read, names: set[str], name: str, field: str) -> torch.Tensor:
    if name not in names:
        raise QuantConfigError(f"tensor {name!r} is missing (quantization_config field {field!r} requires it)")
    return read(name)


class QuantizedLayout:
    """Parsed quantization_config + the tensor names of one checkpoint."""

    def __init__(self, config: dict[str, Any], names: set[str]) -> None:
        self.config, self.names = config, names
        self.method = str(config.get("quant_method", ""))
        if self.method == "compressed-tensors":
            self.suffix, self.groups = ".weight_packed", _ct_groups(config)
        elif self.method in ("awq", "gptq"):
            self.suffix, self.groups = ".qweight", {}
            self.bits = _int_field(config, "bits", (4, 8) if self.method == "gptq" else (4,))
            self.group_size = int(config.get("group_size", -1))
        else:
            raise QuantConfigError(f"quantization_config.quant_method {self.method!r} is not one of "
                                   "compressed-tensors, awq, gptq (fp8 block checkpoints are read elsewhere)")
        self.virtual = {n[: -len(self.suffix)] + ".weight" for n in names if n.endswith(self.suffix)}

    def __contains__(self, name: str) -> bool:
        return name in self.virtual

    def qweight(self, name: str, read: Read) -> QWeight:
        prefix = name.removesuffix(".weight")
        if self.method == "compressed-tensors":
            return self._compressed(prefix, read)
        return self._awq(prefix, read) if self.method == "awq" else self._gptq(prefix, read)

    def _compressed(self, p: str, read: Read) -> QWeight:
        args = _ct_args(self.groups, p)
        bits, sym = args["num_bits"], args.get("symmetric", True)
        n, k = (int(v) for v in _need(read, self.names, f"{p}.weight_shape", "format").tolist())
        q = unpack_int32(read(f"{p}.weight_packed"), bits, 1)[:, :k]  # stored codes are signed + 2^(bits-1)
        scale = _need(read, self.names, f"{p}.weight_scale", "config_groups.weights").float()
        group = args.get("group_size") or k if args.get("strategy") == "group" else k
        _check_scale(f"{p}.weight_scale", scale, n, k, group, "group_size")
        if sym:
            zero = torch.full(scale.shape, 2 ** (bits - 1), dtype=torch.uint8)
        else:
            zp = _need(read, self.names, f"{p}.weight_zero_point", "symmetric")
            if zp.is_floating_point():  # fractional zero points (zp_dtype float32, moemesh.quant.grid)
                _check_scale(f"{p}.weight_zero_point", zp, n, k, group, "group_size")
                zero_f = zp.float() + 2 ** (bits - 1)
                return QWeight(q, scale, zero_f.round().clamp(0, 2**bits - 1).to(torch.uint8), bits, group, zero_f)
            zero = unpack_int32(zp, bits, 0)[:n].to(torch.uint8)
        return QWeight(q, scale, zero, bits, group)

    def _awq(self, p: str, read: Read) -> QWeight:
        qw = unpack_int32(read(f"{p}.qweight"), 4, 1)  # [K, N] columns in AWQ_ORDER within each 8
        k, n = qw.shape
        order = torch.tensor(AWQ_ORDER).argsort()
        undo = lambda t: t.view(t.shape[0], -1, 8)[..., order].reshape(t.shape[0], -1)  # noqa: E731
        scale = _need(read, self.names, f"{p}.scales", "quant_method").float()  # [G, N]
        group = k if self.group_size <= 0 else self.group_size
        _check_scale(f"{p}.scales", scale.T, n, k, group, "group_size")
        zeros = unpack_int32(_need(read, self.names, f"{p}.qzeros", "zero_point"), 4, 1)  # [G, N]
        return QWeight(undo(qw).T.contiguous(), scale.T.contiguous(), undo(zeros).T.contiguous(), 4, group)

    def _gptq(self, p: str, read: Read) -> QWeight:
        bits = self.bits
        qw = unpack_int32(read(f"{p}.qweight"), bits, 0)  # [K, N]
        k, n = qw.shape
        scale = _need(read, self.names, f"{p}.scales", "quant_method").float()  # [G, N]
        group = k if self.group_size <= 0 else self.group_size
        _check_scale(f"{p}.scales", scale.T, n, k, group, "group_size")
        gidx = f"{p}.g_idx"
        if gidx in self.names and not torch.equal(read(gidx).long(), torch.arange(k) // group):
            raise QuantConfigError(f"tensor {gidx!r}: act-order (desc_act) group indices are not supported")
        zeros = unpack_int32(_need(read, self.names, f"{p}.qzeros", "sym"), bits, 1)[:, :n]  # [G, N]
        if self.config.get("checkpoint_format", "gptq") == "gptq":  # v1 stores zero - 1
            zeros = (zeros.to(torch.int16) + 1).clamp(max=2**bits - 1).to(torch.uint8)
        return QWeight(qw.T.contiguous(), scale.T.contiguous(), zeros.T.contiguous(), bits, group)


def _int_field(config: dict, field: str, allowed: tuple[int, ...]) -> int:
    value = config.get(field)
    if value not in allowed:
        raise QuantConfigError(f"quantization_config.{field} {value!r} is not one of {list(allowed)}")
    return int(value)


def _check_scale(name: str, scale: torch.Tensor, n: int, k: int, group: int, field: str) -> None:
    """scale must be [N, K / group]."""
    if group <= 0 or k % group or tuple(scale.shape) != (n, k // group):
        raise QuantConfigError(f"tensor {name!r}: shape {list(scale.shape)} does not fit weight [{n}, {k}] with "
                               f"quantization_config {field} {group} (expected [{n}, {k // max(group, 1)}])")


def _ct_groups(config: dict) -> dict[str, dict]:
    fmt = config.get("format")
    if fmt not in ("pack-quantized", None):
        raise QuantConfigError(f"quantization_config.format {fmt!r}: only pack-quantized is read")
    groups = config.get("config_groups") or {}
    if not groups:
        raise QuantConfigError("quantization_config.config_groups is empty")
    for key, group in groups.items():
        w = group.get("weights") or {}
        if w.get("type", "int") != "int" or w.get("num_bits") not in (4, 8):
            raise QuantConfigError(f"quantization_config.config_groups.{key}.weights: type {w.get('type')!r} "
                                   f"num_bits {w.get('num_bits')!r} (int 4 or 8 is read)")
        if w.get("strategy") not in ("group", "channel"):
            raise QuantConfigError(f"quantization_config.config_groups.{key}.weights.strategy "
                                   f"{w.get('strategy')!r} is not group or channel")
    return groups


def _ct_args(groups: dict[str, dict], prefix: str) -> dict:
    """The weights args of the config group whose targets name this module (explicit names, 're:' or Linear)."""
    import re

    module = prefix.rsplit(".", 1)[-1]
    for group in groups.values():
        for t in group.get("targets", []):
            hit = t == prefix or t == "Linear" or (t.startswith("re:") and re.match(t[3:], prefix)) or t == module
            if hit:
                return group["weights"]
    raise QuantConfigError(f"tensor {prefix + '.weight_packed'!r}: no quantization_config.config_groups target "
                           f"matches module {prefix!r}")
