"""Timing of per-layer decode kernels as a step runs them: every layer's call captured in one CUDA graph (launch
overhead in, host out), replayed by triton.testing.do_bench; microseconds per layer. Shared by the H200 sweeps."""

from __future__ import annotations

import torch
import triton

from moemesh.runtime.gpu import pdl


def graph_us(step, layers: int, use_pdl: bool = False, passes: int = 1, warmup: int = 5, rep: int = 30) -> float:
    """step(i) for i in 0..layers-1 captured once (after `passes` eager passes: compiles, settles the allocator),
    median replay / layers, in microseconds; use_pdl: launched with programmatic dependent launch as at batch 1."""
    with pdl.enabled(use_pdl):
        for _ in range(passes):
            for i in range(layers):
                step(i)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(layers):
                step(i)
    ms = triton.testing.do_bench(graph.replay, warmup=warmup, rep=rep, return_mode="median")
    del graph
    return ms * 1e3 / layers
