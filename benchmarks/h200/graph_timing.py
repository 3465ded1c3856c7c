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


def expert_layers(experts: int, inter: int, hidden: int, layers: int, scheme: str = "int4") -> list[tuple]:
    """`layers` distinct (gate_up [E, 2I, H], down [E, H, I]) stacks of random bf16 weights on the GPU, scaled as
    trained experts (std ~ 1 / sqrt(fan-in)), quantized to `scheme` (quant.quantize)."""
    from moemesh.runtime.quant import quantize

    return [(quantize(torch.randn(experts, 2 * inter, hidden, device="cuda", dtype=torch.bfloat16) / 45, scheme),
             quantize(torch.randn(experts, hidden, inter, device="cuda", dtype=torch.bfloat16) / 28, scheme))
            for _ in range(layers)]


def moe_step(tokens: int, experts: int, hidden: int, top_k: int) -> tuple:
    """(x [T, H] bf16, routing weights [T, K], expert ids [T, K]) of a decode step, softmax top-k of random logits."""
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    w, ids = torch.randn(tokens, experts, device="cuda").softmax(-1).topk(top_k, dim=-1)
    return x, w, ids


def hbm_limit_us(ids: torch.Tensor, hidden: int, inter: int, scheme: str, bandwidth: float = 4.22e12) -> float:
    """Microseconds to read the experts a step touches once (their three matrices, 8-bit or int4 bytes)."""
    return ids.unique().numel() * 3 * hidden * inter * (0.5 if scheme == "int4" else 1) / bandwidth * 1e6


def moe_steps(scheme: str, tokens: list[int], shape: tuple[int, int, int, int], layers: int, bandwidth: float):
    """Seeded: `layers` expert stacks of shape (E, I, H, top-k) in `scheme`, then per token count (stacks, t, x,
    routing weights, ids, the HBM limit of the experts the step touches in us)."""
    experts, inter, hidden, top_k = shape
    torch.manual_seed(0)
    stacks = expert_layers(experts, inter, hidden, layers, scheme)
    for t in tokens:
        x, w, ids = moe_step(t, experts, hidden, top_k)
        yield stacks, t, x, w, ids, hbm_limit_us(ids, hidden, inter, scheme, bandwidth)


def write_json(path, **fields) -> None:
    """fields + the machine, torch, Triton and the command line, as every H200 benchmark records them."""
    import json
    import platform
    import sys

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": torch.cuda.get_device_name(), "host": platform.node(),
                                "torch": torch.__version__, "triton": triton.__version__,
                                "command": " ".join(["python3"] + sys.argv), **fields}, indent=1) + "\n")
