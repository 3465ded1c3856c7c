"""Block shapes of the few-token MoE GEMV (gpu/moe_kernels._moe_gemv) at T=1 as the engine calls it (gate_up gated,
down weighted and summed over slots into float32 rows), over a wider grid than moe_kernel.py's --tune-gemv: narrow
column blocks with whole-K tiles included. Prints the best per kind and the JSON entry for the config file.

    PYTHONPATH=. python3 benchmarks/h200/gemv_sweep.py [none|int4] [unroll,loop,words,dp4a,dp4a32] \
        [gemv_gate_up,gemv_down]

dp4a, dp4a32 (int4 only): the word-wise GEMV on integer dot products, activations rounded to int8 with a step per 128
(per 32) columns (gpu/int4_dp4a.py).

GEMV_SWEEP_BN, GEMV_SWEEP_BK, GEMV_SWEEP_WARPS and GEMV_SWEEP_STAGES (comma-separated) replace the swept
BLOCK_N, BLOCK_K, warps and stages (default 2). (Measured 2026-11-29 and dropped: the word-wise int4 GEMV in a
dynamic K loop, few registers and many programs per SM: gate_up 10.75 us at best vs 9.45 unrolled, down 8.09 vs 7.18.)

(Measured on the H200 and dropped, 2026-11-29: words-xq, the activations' quarters loaded strided and gate/up rows
stacked, gate_up 11.5 vs 9.4 us, down 7.6 vs 7.2. Int4 GEMV on tensor cores: uint16 loads as the dot's A operand, x in
one column of B; SASS 2.56 instructions per weight unrolled, yet 23.2 vs 9.4 us gate_up, 11.9 vs 7.1 us down.
The word-wise GEMV as a persistent loop over tiles, Triton's pipeliner staging the next tiles' words in shared memory
(cp.async, 2-3 stages, 132-396 programs): gate_up 10.9 vs 9.4 us, down 9.6 vs 7.1.)
"""

from __future__ import annotations

import itertools
import json
import os

import torch
import triton

from moemesh.runtime.gpu.fused_moe import moe_gemv


def main() -> None:
    import sys

    from moemesh.runtime.quant import quantize

    scheme = sys.argv[1] if len(sys.argv) > 1 else "none"  # none (bf16) or int4
    # K loops to sweep: unroll (K_STATIC), loop (dynamic), words (int4 only: int4_kernels._int4_words)
    loops = sys.argv[2].split(",") if len(sys.argv) > 2 else ("unroll", "loop")
    e, inter, h, k, n_layers = 128, 768, 2048, 8, 12  # Qwen3-30B-A3B; 12 layers' weights: more than L2 holds
    layers = [(torch.randn(e, 2 * inter, h, device="cuda", dtype=torch.bfloat16) / 45,
               torch.randn(e, h, inter, device="cuda", dtype=torch.bfloat16) / 28) for _ in range(n_layers)]
    if scheme != "none":
        layers = [(quantize(gu, scheme), quantize(dn, scheme)) for gu, dn in layers]
    per_weight = 2.0 if scheme == "none" else 0.5 + 4 / 128  # bytes per weight (int4: + a float32 scale per 128)
    nbytes = {"gemv_gate_up": k * 2 * inter * h * per_weight, "gemv_down": k * h * inter * per_weight}
    ids = torch.randperm(e, device="cuda")[:k].long()
    weights = torch.rand(k, device="cuda")
    hidden = torch.randn(1, h, device="cuda", dtype=torch.bfloat16)
    act = torch.empty(k, inter, device="cuda", dtype=torch.bfloat16)
    out = torch.zeros(1, h, device="cuda")
    best = {}
    kinds = sys.argv[3].split(",") if len(sys.argv) > 3 else ("gemv_gate_up", "gemv_down")
    for kind in kinds:
        timed = []
        # int4: K steps of whole 128-column blocks; down's K (768) is 6 blocks, so 256 or 512 wastes none / 2 of 8
        bks = (256, 512, 1024, 2048) if scheme == "none" else (256, 512) if kind == "gemv_down" else (512, 1024, 2048)
        words_only = set(loops) <= {"words", "dp4a", "dp4a32"}
        bns = (8, 16, 32) if kind == "gemv_down" and words_only else (8, 16) if words_only else (4, 8, 16)
        bns = _ints("GEMV_SWEEP_BN", bns)  # e.g. GEMV_SWEEP_BN=4,8,16,32 GEMV_SWEEP_WARPS=2,4,8: a wider grid
        for loop, bn, bk, warps, stages in itertools.product(loops, bns, _ints("GEMV_SWEEP_BK", bks),
                                                             _ints("GEMV_SWEEP_WARPS", (4, 8)),
                                                             _ints("GEMV_SWEEP_STAGES", (2,))):
            cfg = {"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps, "num_stages": stages,
                   "UNROLL": loop != "loop", "WORDS": loop in ("words", "dp4a", "dp4a32")}
            if loop.startswith("dp4a"):
                cfg["DP4A"] = 32 if loop == "dp4a32" else 128

            def run():  # every layer once, as a decode step does (a graph: no launch overhead, L2 cold-ish)
                for gu, dn in layers:
                    if kind == "gemv_gate_up":
                        moe_gemv(hidden, gu, act, ids, k, cfg, up_rows=inter)
                    else:
                        moe_gemv(act, dn, out, ids, 1, cfg, weights=weights, sum_slots=k)
            try:
                run()
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    run()
                us = triton.testing.do_bench(graph.replay, warmup=5, rep=30, return_mode="median") / n_layers
                timed.append((us, cfg))
            except Exception as exc:  # noqa: BLE001 -- a tile that does not fit: skip
                print("skip", cfg, type(exc).__name__)
        timed.sort(key=lambda x: x[0])
        for loop in loops:
            for us, cfg in [x for x in timed if _loop(x[1]) == loop][:6]:
                print(f"{scheme} {kind}: {us * 1e3:.2f} us {nbytes[kind] / us / 1e6:.0f} GB/s {cfg}", flush=True)
        best[kind] = timed[0][1]
    print(json.dumps(best))


def _ints(name: str, default: tuple) -> tuple:
    """The environment's comma-separated override of a swept axis, else the default."""
    value = os.environ.get(name)
    return tuple(int(v) for v in value.split(",")) if value else default


def _loop(cfg: dict) -> str:
    if cfg.get("DP4A"):
        return "dp4a32" if cfg["DP4A"] == 32 else "dp4a"
    return "words" if cfg["WORDS"] else "unroll" if cfg["UNROLL"] else "loop"


if __name__ == "__main__":
    main()
