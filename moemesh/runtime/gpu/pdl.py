"""Programmatic dependent launch (PDL, Hopper+): the next kernel of the decode chain is launched while the current
one finishes, instead of after it.

A decode step at batch 1 is ~11 small kernels per layer, each a few microseconds; between two kernels of a CUDA
graph the GPU still drains the first grid and ramps up the second (~1 us). With PDL every kernel (1) lets its
dependents launch as soon as all of its own programs are resident (`gdc_launch_dependents`) and (2) waits, before
touching memory, until the kernel before it has finished and flushed its writes (`gdc_wait`). (2) comes first in
program order for every read, so results are the same as without PDL: each kernel still sees all writes of all
earlier kernels (the wait is transitive along the chain; a kernel launched without PDL, e.g. a torch fill, simply
starts after its predecessor as usual).

    with pdl.enabled(rows <= MAX_ROWS):      # decode_graphs.py, around a small bucket's forward
        kernel[grid](..., **pdl.launch())    # {"PDL": True, "launch_pdl": True} inside, {"PDL": False} outside
    @triton.jit def k(..., PDL: tl.constexpr = False):  enter(PDL)  # first statement

Measured on the H200 (Qwen3-30B-A3B shape, 48 layers, graph replay): batch 1 3.03 -> 2.74 ms, batch 8 8.37 -> 8.16
ms, batch 64 unchanged on the GPU but 1 ms slower per step end to end; so it is on up to MAX_ROWS rows. Off on the
CPU and under Triton's interpreter (PDL compiles away), before compute capability 9.0, and with MOEMESH_PDL=0.

Weights are read before the wait (dense_gemv): the o GEMV after a 4 us latency-bound kernel adds only 4.0 us (4.2 TB/s
for its 16.8 MB). Measured on the H200 and dropped, 2026-11-29: pulling weights into L2 ahead with Hopper's bulk
prefetch (cp.async.bulk.prefetch.L2, 16 KB pieces from 16-128 programs, from a kernel of its own or from the idle
kernel before the GEMV): slower every time (o 8.1 -> 12.6 us with the idle kernel, q/k/v 10.5 -> 14.4, int4 expert
GEMVs 14.6 -> 40.6, bf16 24.4 -> 55.5): the programs that issue it end only when it lands, ~2 TB/s at best.
Also dropped, 2026-11-30: the expert down GEMV issuing prefetch.global.L2 for its rows before its wait (expert ids
read early, the gate_up GEMV waiting before it let the down GEMV launch). Graph replay of the 48-layer step, on / off:
bf16 batch 1 2.65 / 2.45 ms, batch 2 4.10 / 3.55; fp8 2.36 / 2.15; int4 1.96 / 1.95 (unchanged at batch 8).
Also dropped, 2026-12-01 (benchmarks/h200/l2_prefetch.py, l2-prefetch-h200.json): the next layer's q/k/v weights
read into L2 by a parallel graph branch while this layer's int4 experts run. Even from L2 that GEMV takes 5.1 us
against 7.7 from HBM, and the branch (21 MB) outlasts the experts' 12.9 us: the chain rose from 18.7 to 19.8-36.7 us.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl


def _enabled() -> bool:
    if os.environ.get("MOEMESH_PDL", "1") == "0" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


ON = _enabled()
MAX_ROWS = 8  # PDL for steps of up to this many rows (see the measurements above)
_active = False


@contextlib.contextmanager
def enabled(on: bool):
    """Kernels launched inside use PDL when `on` (and the GPU and settings allow it)."""
    global _active
    previous, _active = _active, on and ON
    try:
        yield
    finally:
        _active = previous


def launch() -> dict:
    """The PDL constexpr and launch option for a kernel launched now."""
    return {"PDL": True, "launch_pdl": True} if _active else {"PDL": False}


@triton.jit
def enter(PDL: tl.constexpr):
    """Let the next kernel launch, then wait for the previous one's writes (see the module doc)."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
