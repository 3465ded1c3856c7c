"""Does warming the next layer's q/k/v weights into L2 while this layer's int4 experts run (a parallel branch of the
decode graph) make the q/k/v GEMV cheaper? Batch 1, Qwen3-30B-A3B shapes, 12 layers' distinct weights in one CUDA
graph (PDL on the main chain, as a batch-1 step launches it); microseconds per layer.

    main:   moe_q8(layer i) ------------------------------> join -> q/k/v GEMV (W_qkv of layer i + 1)
    branch:        fork -> touch(W_qkv of layer i + 1) ---/        (loads with evict_last; a sink keeps them live)

Rows: the chain without the branch; with it at several touch grids; the GEMV alone; the GEMV on weights already in
L2 (its own second pass), the floor any warming can reach.

    PYTHONPATH=. python3 benchmarks/h200/l2_prefetch.py [--out DIR]
"""

from __future__ import annotations

import argparse
import pathlib

import torch
import triton
import triton.language as tl

from graph_timing import expert_layers, graph_us, write_json
from moemesh.runtime.gpu import pdl
from moemesh.runtime.gpu.dense_gemv import linear
from moemesh.runtime.gpu.fused_moe import q8_configs
from moemesh.runtime.gpu.int4_q8 import moe_q8

E, INTER, H, K, LAYERS, QKV = 128, 768, 2048, 8, 12, 5120


@triton.jit
def _touch(w_ptr, n_words, sink_ptr, BLOCK: tl.constexpr):
    """Reads words [0, n_words) of w (int32 view) with evict_last, grid-strided; xor-sums them into sink[pid]."""
    pid, nprog = tl.program_id(0), tl.num_programs(0)
    acc = tl.zeros((BLOCK,), tl.int32)
    for start in range(pid * BLOCK, n_words, nprog * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc ^= tl.load(w_ptr + offs, mask=offs < n_words, other=0, eviction_policy="evict_last")
    tl.store(sink_ptr + pid, tl.xor_sum(acc, 0))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    torch.manual_seed(0)
    experts = expert_layers(E, INTER, H, LAYERS)
    qkv = [torch.randn(QKV, H, device="cuda", dtype=torch.bfloat16) / 45 for _ in range(LAYERS + 1)]
    cfg_up, cfg_dn = q8_configs(experts[0][0])
    ids = torch.randperm(E, device="cuda")[:K].long()
    weights = torch.rand(K, device="cuda")
    h = torch.randn(1, H, device="cuda", dtype=torch.bfloat16)
    sink = torch.empty(1024, device="cuda", dtype=torch.int32)
    side = torch.cuda.Stream()
    rows = []

    def record(name, us):
        rows.append({"variant": name, "us_per_layer": round(us, 2)})
        print(f"{name:44s} {us:7.2f} us", flush=True)

    def chain(i, grid=0, block=2048, warps=4):
        main = torch.cuda.current_stream()
        if grid:
            side.wait_stream(main)
            with torch.cuda.stream(side), pdl.enabled(False):
                w = qkv[i + 1].view(torch.int32)
                _touch[(grid,)](w, w.numel(), sink, BLOCK=block, num_warps=warps)
        moe_q8(h, *experts[i], ids, weights, cfg_up, cfg_dn)
        if grid:
            main.wait_stream(side)
        linear(h, qkv[i + 1])

    record("moe_q8 alone", graph_us(lambda i: moe_q8(h, *experts[i], ids, weights, cfg_up, cfg_dn), LAYERS, True))
    alone = graph_us(lambda i: linear(h, qkv[i]), LAYERS, True)
    record("q/k/v GEMV alone", alone)
    record("q/k/v GEMV, weights in L2 (its second pass)",
           graph_us(lambda i: (linear(h, qkv[i]), linear(h, qkv[i])), LAYERS, True) - alone)
    record("chain: moe_q8 + q/k/v GEMV", graph_us(chain, LAYERS, True))
    for grid, block, warps in ((132, 2048, 4), (264, 2048, 4), (66, 4096, 8), (528, 1024, 4)):
        record(f"chain, branch touch grid {grid} block {block} warps {warps}",
               graph_us(lambda i: chain(i, grid, block, warps), LAYERS, True))
    write_json(pathlib.Path(args.out) / "l2-prefetch-h200.json", rows=rows)


if __name__ == "__main__":
    main()
