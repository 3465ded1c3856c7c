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


def int4_expert_layers(experts: int, inter: int, hidden: int, layers: int) -> list[tuple]:
    """`layers` distinct (gate_up [E, 2I, H], down [E, H, I]) int4 stacks of random bf16 weights on the GPU, scaled
    as trained experts (std ~ 1 / sqrt(fan-in))."""
    from moemesh.runtime.quant import quantize

    return [(quantize(torch.randn(experts, 2 * inter, hidden, device="cuda", dtype=torch.bfloat16) / 45, "int4"),
             quantize(torch.randn(experts, hidden, inter, device="cuda", dtype=torch.bfloat16) / 28, "int4"))
            for _ in range(layers)]


def write_json(path, **fields) -> None:
    """fields + the machine, torch, Triton and the command line, as every H200 benchmark records them."""
    import json
    import platform
    import sys

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": torch.cuda.get_device_name(), "host": platform.node(),
                                "torch": torch.__version__, "triton": triton.__version__,
                                "command": " ".join(["python3"] + sys.argv), **fields}, indent=1) + "\n")
