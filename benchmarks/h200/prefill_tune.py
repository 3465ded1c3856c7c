"""Prefill-size block configs of the fused MoE GEMM (gpu/moe_kernels._moe_gemm) over a Hopper-sized grid (128-row
and 256-column tiles, BLOCK_K 64/128, 3-4 stages: moe_kernel.py's --tune grid stops at 128 x 128 x 64), at the token
counts given; merges the best per (T, kernel) into the bf16 config file (other entries kept) and prints TFLOP/s.

    PYTHONPATH=. python3 benchmarks/h200/prefill_tune.py --tokens 1024,4096
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moe_kernel import layers_of_weights, routing  # noqa: E402

from moemesh.runtime.gpu import fused_moe as fm  # noqa: E402
from moemesh.runtime.gpu.moe_align import align  # noqa: E402

GRID = list(itertools.product((64, 128), (128, 256), (64, 128), (8,), (4, 8), (3, 4)))
KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")


def best_for(t: int, layers, k: int) -> dict:
    e, two_i, h = layers[0][0].shape
    ids, weights = routing(t, e, k)
    hidden = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
    act = torch.randn(t * k, two_i // 2, device="cuda", dtype=torch.bfloat16)
    y = torch.empty(t * k, h, device="cuda")
    best = {}
    for kind in ("gate_up", "down"):
        timed = []
        for values in GRID:
            cfg = dict(zip(KEYS, values))
            al = align(ids, e, cfg["BLOCK_M"])
            it = itertools.cycle(layers)

            def run():
                gu, dn = next(it)
                if kind == "gate_up":
                    fm.moe_gemm(hidden, gu, act, al, k, cfg, up_rows=two_i // 2)
                else:
                    fm.moe_gemm(act, dn, y, al, 1, cfg, weights=weights.view(-1))
            try:
                timed.append((triton.testing.do_bench(run, warmup=3, rep=20, return_mode="median"), cfg))
            except Exception as exc:  # noqa: BLE001 -- out of shared memory or registers: skip
                print(f"  skip {cfg}: {type(exc).__name__}", flush=True)
        ms, best[kind] = min(timed, key=lambda x: x[0])
        flops = t * k * h * (two_i if kind == "gate_up" else two_i // 2) * 2
        print(f"T={t} {kind}: {ms * 1e3:.0f} us, {flops / ms / 1e9:.0f} TFLOP/s {best[kind]}", flush=True)
    return best


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=lambda s: [int(x) for x in s.split(",")], default=[1024, 4096])
    args = p.parse_args()
    layers = layers_of_weights(4, 128, 2048, 768)
    name = fm.config_name(128, 768, 2048, torch.bfloat16, torch.cuda.get_device_name())
    path = fm.CONFIG_DIR / name
    table = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    for t in args.tokens:
        table.setdefault(str(t), {}).update(best_for(t, layers, 8))
    path.write_text(json.dumps(table, indent=1) + "\n")
    print(json.dumps({t: table[str(t)] for t in args.tokens}))


if __name__ == "__main__":
    main()
