"""Writes a quantized checkpoint in the compressed-tensors `pack-quantized` layout (what llmcompressor writes and
transformers / vLLM load): per quantized Linear `<p>`:

    <p>.weight_packed     int32 [N, K*bits/32]   codes q in [0, 2^bits) (= signed value + 2^(bits-1)), packed along K
    <p>.weight_scale      [N, K/group]           in the checkpoint's float dtype
    <p>.weight_zero_point int32 [ceil(N*bits/32), K/group]  asymmetric only: signed zero point, packed along N
    <p>.weight_shape      int64 [2]

Modules of each bit width form one config group listing them by name (so mixed int4/int8 is unambiguous).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from moemesh.quant.formats import pack_int32
from moemesh.quant.packing import QWeight


def packed_tensors(prefix: str, qw: QWeight, dtype: torch.dtype, symmetric: bool) -> dict[str, torch.Tensor]:
    out = {f"{prefix}.weight_packed": pack_int32(qw.q, qw.bits, 1),
           f"{prefix}.weight_scale": qw.scale.to(dtype),
           f"{prefix}.weight_shape": torch.tensor(list(qw.shape), dtype=torch.int64)}
    if qw.zero_f is not None:  # fractional zero points (grid.py): float, unpacked, signed like the integer ones
        out[f"{prefix}.weight_zero_point"] = qw.zero_f - 2 ** (qw.bits - 1)
    elif not symmetric:
        out[f"{prefix}.weight_zero_point"] = pack_int32(qw.zero, qw.bits, 0)  # stored = signed + 2^(bits-1) = zero
    return out


def quantization_config(modules: dict, group: int, symmetric: bool, float_zero: tuple[int, ...] = ()) -> dict:
    """modules: bits, or (bits, group size), -> module names (no `.weight`); a plain bits key uses `group`.
    float_zero: bit widths whose zero points are float (grid)."""
    groups = {}
    keyed = {(k, group) if isinstance(k, int) else tuple(k): names for k, names in modules.items()}
    for i, ((bits, group), names) in enumerate(sorted(keyed.items())):
        groups[f"group_{i}"] = {
            "targets": sorted(names), "input_activations": None, "output_activations": None,
            "format": "pack-quantized",
            "weights": {"num_bits": bits, "type": "int", "symmetric": symmetric, "dynamic": False,
                        "strategy": "group", "group_size": group, "observer": "minmax", "actorder": None,
                        **({"zp_dtype": "float32"} if bits in float_zero else {})},
        }
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": groups, "ignore": ["lm_head"], "kv_cache_scheme": None}


def write_checkpoint(src: Path, out: Path, tensors: dict[str, torch.Tensor], qconfig: dict, extra: dict) -> None:
    """Copies the non-weight files of src (tokenizer, generation config), writes model.safetensors and config.json
    with quantization_config (and `extra` under moemesh_quantization: method, calibration, fallbacks)."""
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name not in ("config.json",
                                                                                  "model.safetensors.index.json"):
            shutil.copy2(f, out / f.name)
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    config["quantization_config"] = qconfig
    config["moemesh_quantization"] = extra
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
