"""GPU kernels of the runtime (Triton), used on CUDA only; the CPU keeps the plain torch paths as the reference.

    fused_moe.py        routed experts: on-device sort by expert (moe_align.py, align_kernel.py) + two grouped
                        GEMM kernels (gate_up with SiLU-and-mul fused, down with the routing weight), or two GEMV
                        kernels for a few tokens (moe_kernels.py), bf16 or fp8/int8 weights dequantized in registers;
                        block shapes tuned per token count in configs/
    fused_ops.py        residual add + RMSNorm, per-head q/k norm + rope, softmax top-k routing: one launch each
    paged_attention.py  decode attention (one query token per sequence) reading K/V through block tables
    mla_decode.py       DeepSeek MLA decode, weight-absorbed, over the paged latent cache (split context + merge)
    decode_graphs.py    CUDA graphs of whole decode steps per batch-size bucket, over static buffers

Nothing here is imported unless the device is CUDA and Triton is installed (`triton_available`).
"""

from __future__ import annotations

import importlib.util

import torch


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def kernels_usable(device: torch.device, dtype: torch.dtype) -> str:
    """'' when the Triton kernels can run for this device and dtype, else why not (recorded in EngineInfo)."""
    if device.type != "cuda":
        return f"device {device.type} is not CUDA"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if not triton_available():
        return "triton is not installed"
    if dtype not in (torch.bfloat16, torch.float16):
        return f"dtype {str(dtype).removeprefix('torch.')} (the kernels take bfloat16 or float16)"
    return ""


def decode_plan(spec, device: torch.device, dtype: torch.dtype, dispatch, cuda_graphs: bool) -> tuple[bool, bool, str]:
    """(use the paged decode runner, capture it in CUDA graphs, the EngineInfo.cuda_graphs note)."""
    a = spec.attention
    reason = kernels_usable(device, dtype)
    if not reason and not a.mla and a.head_dim & (a.head_dim - 1):  # MLA decodes over the latent (mla_decode.py)
        reason = f"head_dim {a.head_dim} is not a power of two (paged decode kernel)"
    if reason:
        return False, False, f"off: {reason}"
    if not getattr(dispatch, "capturable", False):
        return True, False, f"off: dispatch {type(dispatch).__name__} cannot be captured (decode runs eagerly)"
    if not cuda_graphs:
        return True, False, "off: disabled by the caller (decode runs eagerly with paged attention)"
    from moemesh.runtime.gpu.decode_graphs import BUCKETS

    return True, True, f"on: decode steps of 1-{BUCKETS[-1]} sequences, buckets {','.join(map(str, BUCKETS))}"
