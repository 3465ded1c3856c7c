"""One line saying how a checkpoint's weights are quantized, from its config.json alone (no torch, no tensors):
what Router.Info.quantization and the gateway's /v1/models report for a quantized checkpoint.

    "none" | "int4 gptq group 32 (compressed-tensors)" | "int4+int8 grid group 32 (compressed-tensors)"
    | "int4 awq group 128 (awq)" | "int8 gptq group 128 (gptq)" | "fp8 block 128x128"
"""

from __future__ import annotations

import json
from pathlib import Path


def describe_config(config: dict) -> str:
    """config: a parsed config.json."""
    q = config.get("quantization_config") or {}
    method = q.get("quant_method")
    if not method:
        return "none"
    if method == "fp8":
        block = q.get("weight_block_size")
        return f"fp8 block {block[0]}x{block[1]}" if block else "fp8"
    made_by = (config.get("moemesh_quantization") or {}).get("method")  # rtn/gptq/grid when moemesh wrote it
    if method == "compressed-tensors":
        weights = [g.get("weights") or {} for g in (q.get("config_groups") or {}).values()]
        bits = "+".join(f"int{b}" for b in sorted({w.get("num_bits") for w in weights if w.get("num_bits")}))
        groups = sorted({w.get("group_size") for w in weights if w.get("group_size")})
        group = f" group {'/'.join(str(g) for g in groups)}" if groups else ""
        return f"{bits or 'int'}{' ' + made_by if made_by else ''}{group} (compressed-tensors)"
    group = q.get("group_size") or q.get("q_group_size")
    bits = q.get("bits") or q.get("w_bit")
    return f"int{bits} {method}{f' group {group}' if group and group > 0 else ''} ({method})"


def describe_checkpoint(model_dir: str | Path) -> str:
    """describe_config of <model_dir>/config.json; "none" when there is no such directory (a hub id, a built-in
    name not yet downloaded) or no quantization_config."""
    path = Path(model_dir).expanduser() / "config.json"
    if not path.is_file():
        return "none"
    return describe_config(json.loads(path.read_text(encoding="utf-8")))
