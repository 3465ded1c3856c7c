"""Same-GPU expert data plane: device buffers the router allocates and an expert shard process maps (CUDA IPC).

One device allocation per shard link, laid out as the shared-memory region (shm_region.Layout) plus two flag rows:

    hidden    [Tmax, H]  dtype    router -> shard, rows 0..T-1 of the current MoE layer
    ids       [Tmax, K]  int32    router -> shard, global expert ids (-1: unused slot)
    weights   [Tmax, K]  float32  router -> shard
    output    [Tmax, H]  dtype    shard -> router, partial sum over the shard's hosted selected experts
    flags_in  [L]        int32    layer l's inputs are ready (router sets 1, the shard's stream resets to 0)
    flags_out [L]        int32    layer l's output is ready (shard sets 1, the router's stream resets to 0)

Ordering never goes through the host per layer: both sides enqueue CUDA stream memory operations
(cuStreamWriteValue32 / cuStreamWaitValue32, through ctypes on libcuda) on those flags, so the GPU front end of
each process waits for the other's write without a kernel spinning on an SM, and both processes can capture their
side in CUDA graphs (the driver records the operations as memop nodes). Flags take the values 0/1 only and each
side resets what it consumed, so a captured graph replays with fixed values. The host signals once per executed
step (the SOCK_SEQPACKET socket of shm_region: seq, T), not per layer.

Sharing: the router exports the allocation with the storage's CUDA IPC handle (what torch.multiprocessing sends
between processes); IpcHandle is that tuple as plain fields so the Attach RPC carries no pickle.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from moemesh.serving import shm_region

WAIT_EQ = 0x1  # CU_STREAM_WAIT_VALUE_EQ
_lib = None


def _driver():
    """libcuda's stream memory operations (the _v2 entry points of CUDA >= 11.7, else the originals)."""
    global _lib
    if _lib is None:
        lib = ctypes.CDLL("libcuda.so.1")
        fns = []
        for name in ("cuStreamWriteValue32", "cuStreamWaitValue32"):
            fn = getattr(lib, f"{name}_v2", None) or getattr(lib, name)
            fn.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
            fn.restype = ctypes.c_int
            fns.append(fn)
        lib.cuGetErrorString.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        _lib = (lib, *fns)
    return _lib


def _check(code: int, what: str) -> None:
    if code:
        text = ctypes.c_char_p()
        _driver()[0].cuGetErrorString(code, ctypes.byref(text))
        raise RuntimeError(f"{what}: CUDA error {code} ({(text.value or b'?').decode()})")


def write_flag(flag: torch.Tensor, value: int) -> None:
    """Enqueues `*flag = value` on the current stream, after the stream's earlier work (memory barrier included)."""
    stream = torch.cuda.current_stream(flag.device).cuda_stream
    _check(_driver()[1](ctypes.c_void_p(stream), flag.data_ptr(), value, 0), "cuStreamWriteValue32")


def wait_flag(flag: torch.Tensor, value: int) -> None:
    """Enqueues a wait until `*flag == value` on the current stream (later work starts after it)."""
    stream = torch.cuda.current_stream(flag.device).cuda_stream
    _check(_driver()[2](ctypes.c_void_p(stream), flag.data_ptr(), value, WAIT_EQ), "cuStreamWaitValue32")


def graphs_refusal(device: torch.device) -> str:
    """'' when flag operations can be captured in a CUDA graph here, else why not (then both sides run eagerly)."""
    try:
        flag = torch.zeros(1, dtype=torch.int32, device=device)
        graph, side = torch.cuda.CUDAGraph(), torch.cuda.Stream(device)
        with torch.cuda.stream(side), torch.cuda.graph(graph, stream=side):
            write_flag(flag, 1)
        graph.replay()
        torch.cuda.synchronize(device)
        return "" if int(flag.item()) == 1 else "a captured flag write did not land"
    except Exception as exc:  # noqa: BLE001 -- any failure means: do not capture
        return f"capturing stream memory operations failed: {type(exc).__name__}: {exc}"


@dataclass(frozen=True)
class IpcHandle:
    """torch.UntypedStorage._share_cuda_() of the region's allocation, field by field."""

    device: int
    handle: bytes
    size_bytes: int
    offset_bytes: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool


def region_bytes(layout: shm_region.Layout, num_layers: int) -> tuple[int, int]:
    """(offset of flags_in, total bytes): the shm layout's buffers, then [2, L] int32 flags."""
    flags = layout.offsets()[4]
    return flags, flags + 2 * num_layers * 4


class DeviceRegion:
    """The buffers (views into one uint8 device allocation); see the module doc for shapes."""

    def __init__(self, raw: torch.Tensor, layout: shm_region.Layout, num_layers: int) -> None:
        self.raw, self.layout, self.num_layers = raw, layout, num_layers  # raw keeps the allocation alive
        o_hidden, o_ids, o_weights, o_out, _ = layout.offsets()
        o_flags, total = region_bytes(layout, num_layers)
        if raw.numel() < total:
            raise ValueError(f"device region holds {raw.numel()} bytes, the layout needs {total}")
        t, h, k, dtype = layout.max_tokens, layout.hidden_size, layout.top_k, shm_region.DTYPES[layout.dtype]
        self.hidden = raw[o_hidden:o_hidden + t * h * dtype.itemsize].view(dtype).view(t, h)  # [Tmax, H]
        self.ids = raw[o_ids:o_ids + t * k * 4].view(torch.int32).view(t, k)  # [Tmax, K]
        self.weights = raw[o_weights:o_weights + t * k * 4].view(torch.float32).view(t, k)  # [Tmax, K]
        self.output = raw[o_out:o_out + t * h * dtype.itemsize].view(dtype).view(t, h)  # [Tmax, H]
        flags = raw[o_flags:total].view(torch.int32).view(2, num_layers)
        self.flags_in, self.flags_out = flags[0], flags[1]  # [L] each

    @classmethod
    def create(cls, layout: shm_region.Layout, num_layers: int, device: torch.device) -> DeviceRegion:
        _, total = region_bytes(layout, num_layers)
        return cls(torch.zeros(total, dtype=torch.uint8, device=device), layout, num_layers)

    def share(self) -> IpcHandle:
        torch.cuda.synchronize(self.raw.device)  # the zeroed flags are in memory before the shard maps them
        return IpcHandle(*self.raw.untyped_storage()._share_cuda_())

    @classmethod
    def open(cls, handle: IpcHandle, layout: shm_region.Layout, num_layers: int) -> DeviceRegion:
        """Maps the router's allocation in this process (same GPU); RuntimeError when CUDA refuses."""
        torch.cuda._lazy_init()
        storage = torch.UntypedStorage._new_shared_cuda(
            handle.device, handle.handle, handle.size_bytes, handle.offset_bytes, handle.ref_counter_handle,
            handle.ref_counter_offset, handle.event_handle, handle.event_sync_required)
        raw = torch.empty(0, dtype=torch.uint8, device=f"cuda:{handle.device}").set_(storage)
        return cls(raw, layout, num_layers)


def normalize_device(device: str) -> str:
    """'cuda' -> 'cuda:0' (the default device of a process that sets none); others unchanged."""
    d = torch.device(device)
    return f"cuda:{d.index or 0}" if d.type == "cuda" else str(d)
