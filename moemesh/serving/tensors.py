"""torch.Tensor <-> moemesh.v1.Tensor: raw little-endian bytes with dtype and shape, never repeated floats.

Encoding copies the tensor's bytes once (into the message's bytes field). Decoding wraps the message's bytes without
copying (torch.frombuffer): the result is read-only memory, so pass `writable=True` to get a private copy when the
caller modifies it in place. bfloat16 (which numpy lacks) travels through a byte view of the tensor.
"""

from __future__ import annotations

import math
import sys
import warnings

import torch

from moemesh.v1 import common_pb2

if sys.byteorder != "little":  # the wire format is little-endian and we copy raw memory
    raise ImportError("moemesh tensors need a little-endian host")

TORCH_TO_WIRE: dict[torch.dtype, int] = {
    torch.float32: common_pb2.DTYPE_FLOAT32,
    torch.float16: common_pb2.DTYPE_FLOAT16,
    torch.bfloat16: common_pb2.DTYPE_BFLOAT16,
    torch.int32: common_pb2.DTYPE_INT32,
    torch.int64: common_pb2.DTYPE_INT64,
    torch.int8: common_pb2.DTYPE_INT8,
    torch.uint8: common_pb2.DTYPE_UINT8,
}
WIRE_TO_TORCH: dict[int, torch.dtype] = {v: k for k, v in TORCH_TO_WIRE.items()}


def to_proto(tensor: torch.Tensor, out: common_pb2.Tensor | None = None) -> common_pb2.Tensor:
    """Encodes a tensor (any device, any strides) into `out` (or a new message) and returns it."""
    if tensor.dtype not in TORCH_TO_WIRE:
        raise ValueError(f"tensor dtype {tensor.dtype} has no wire type; supported: {sorted(map(str, TORCH_TO_WIRE))}")
    msg = common_pb2.Tensor() if out is None else out
    msg.dtype = TORCH_TO_WIRE[tensor.dtype]
    del msg.shape[:]
    msg.shape.extend(tensor.shape)
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    # A byte view works for every dtype, bfloat16 included; numpy().tobytes() is the one copy.
    msg.data = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    return msg


def from_proto(msg: common_pb2.Tensor, *, name: str = "tensor", writable: bool = False) -> torch.Tensor:
    """Decodes a message; `name` (the field, e.g. "hidden") appears in errors. Raises ValueError on bad input."""
    if msg.WhichOneof("payload") == "external":
        raise NotImplementedError(
            f"{name}: external payloads ({common_pb2.Transport.Name(msg.external.transport)}) are not supported yet"
        )
    dtype = WIRE_TO_TORCH.get(msg.dtype)
    if dtype is None:
        raise ValueError(f"{name}.dtype: unsupported dtype {common_pb2.DType.Name(msg.dtype) if msg.dtype in common_pb2.DType.values() else msg.dtype}")
    shape = tuple(int(d) for d in msg.shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    expected = math.prod(shape) * itemsize
    data = msg.data
    if len(data) != expected:
        raise ValueError(
            f"{name}.data: {len(data)} bytes, expected {expected} for {str(dtype).removeprefix('torch.')}{list(shape)}"
        )
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "non-writable buffer": documented above
        flat = torch.frombuffer(data, dtype=torch.uint8)
    tensor = flat.view(dtype).reshape(shape)
    return tensor.clone() if writable else tensor
