"""Lazy, selective reads from a safetensors checkpoint: a shard or the router reads only the tensors it needs.

`Checkpoint` maps tensor names to files (one model.safetensors, or shards listed by model.safetensors.index.json, or
every *.safetensors) and reads single tensors or slices of their first dimension through `safe_open` (memory
mapped: only the bytes of what is read are touched). Every read is logged in `reads` (tests check it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from moemesh.runtime.spec import ConfigError


def resolve_model_dir(model: str | Path) -> Path:
    """A built-in name, a checkpoint directory or a Hugging Face repo id -> local directory (the registry decides;
    imported here, not at module level, because building a built-in MoE runs the converter, which uses the runtime)."""
    from moemesh.models.registry import resolve_model

    return resolve_model(model, progress=False)


class Checkpoint:
    """Tensor name -> file index over a checkpoint directory; reads tensors and first-dim slices on demand."""

    def __init__(self, model_dir: str | Path) -> None:
        self.dir = Path(model_dir)
        self.files = self._index()  # name -> file name
        self.fp8_block = _fp8_block_size(self.dir)  # DeepSeek-style FP8 weights: dequantized on read
        # int4/int8 layouts (compressed-tensors, AWQ, GPTQ): `<p>.weight` is virtual, rebuilt from codes + scales;
        # every QWeight read is kept in `quantized` so the ONNX Runtime backend can use the integer codes as is.
        self.quant = quantized_layout(self.dir, set(self.files))
        self.quantized: dict[str, Any] = {}
        self._handles: dict[str, Any] = {}
        self.reads: list[str] = []  # names read, in order (slices as "name[i]")

    def _index(self) -> dict[str, str]:
        index_file = self.dir / "model.safetensors.index.json"
        if index_file.is_file():
            return dict(json.loads(index_file.read_text(encoding="utf-8"))["weight_map"])
        files = sorted(p.name for p in self.dir.glob("*.safetensors"))
        if not files:
            raise ConfigError(f"no *.safetensors weights in {str(self.dir)!r}")
        mapping: dict[str, str] = {}
        for name in files:
            with safe_open(str(self.dir / name), framework="pt") as f:
                mapping.update(dict.fromkeys(f.keys(), name))
        return mapping

    def __contains__(self, name: str) -> bool:
        return name in self.files or (self.quant is not None and name in self.quant)

    def names(self) -> list[str]:
        return list(self.files)

    def _handle(self, name: str) -> Any:
        if name not in self.files:
            raise KeyError(f"tensor {name!r} not found in checkpoint {str(self.dir)!r}")
        file = self.files[name]
        if file not in self._handles:
            self._handles[file] = safe_open(str(self.dir / file), framework="pt")
        return self._handles[file]

    def shape(self, name: str) -> list[int]:
        return list(self._handle(name).get_slice(name).get_shape())

    def read(self, name: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
        if name not in self.files and self.quant is not None and name in self.quant:
            qweight = self.quantized[name] = self.quant.qweight(name, self._raw)
            self.reads.append(name)
            return _place(qweight.dequantize(), device, dtype or torch.float32)
        tensor = self._handle(name).get_tensor(name)
        self.reads.append(name)
        scale = f"{name}_scale_inv"
        if tensor.dtype in FP8_DTYPES and scale in self.files:
            tensor = dequantize_fp8(tensor, self._handle(scale).get_tensor(scale), self.fp8_block)
            self.reads.append(scale)
        return _place(tensor, device, dtype)

    def read_fp8(self, name: str, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(weight [M, N] fp8, weight_scale_inv [ceil(M/bm), ceil(N/bn)] float32) as stored, for serving in FP8."""
        scale = f"{name}_scale_inv"
        tensor, scale_inv = self._handle(name).get_tensor(name), self._handle(scale).get_tensor(scale)
        self.reads += [name, scale]
        return tensor.to(device), scale_inv.float().to(device)

    def _raw(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)

    def read_rows(self, name: str, index: int, device: torch.device | str = "cpu",
                  dtype: torch.dtype | None = None) -> torch.Tensor:
        """tensor[index] of a stacked tensor, reading only that slice."""
        tensor = self._handle(name).get_slice(name)[index : index + 1][0]
        self.reads.append(f"{name}[{index}]")
        return _place(tensor, device, dtype)

    def close(self) -> None:
        self._handles.clear()  # safe_open handles release their mapping when collected

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def quantized_layout(model_dir: Path, names: set[str]):
    """moemesh.quant.formats.QuantizedLayout of an int4/int8 checkpoint, None for float and FP8 checkpoints."""
    config = model_dir / "config.json"
    data = json.loads(config.read_text(encoding="utf-8")) if config.is_file() else {}
    qconfig = data.get("quantization_config")
    if not qconfig or qconfig.get("quant_method") == "fp8":
        return None
    from moemesh.quant.formats import QuantizedLayout  # only quantized checkpoints pay the import

    return QuantizedLayout(qconfig, names)


def _fp8_block_size(model_dir: Path) -> tuple[int, int]:
    config = model_dir / "config.json"
    data = json.loads(config.read_text(encoding="utf-8")) if config.is_file() else {}
    block = (data.get("quantization_config") or {}).get("weight_block_size") or (128, 128)
    return int(block[0]), int(block[1])


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Block-scaled FP8 [M, N] with scale_inv [ceil(M/bm), ceil(N/bn)] -> float32 weight * its block's scale."""
    m, n = weight.shape
    scale = scale_inv.float().repeat_interleave(block[0], 0)[:m].repeat_interleave(block[1], 1)[:, :n]  # [M, N]
    return weight.float() * scale


def _place(tensor: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is not None and tensor.is_floating_point():
        tensor = tensor.to(dtype)
    return tensor.to(device).contiguous()
