"""Paged decode attention (Qwen3-30B-A3B's 32 q / 4 kv heads of 128, KV blocks of 16 tokens) over batch x context:
what paged_attention runs today (its splits_for and BLOCK_N) beside every (splits, BLOCK_N, num_warps) variant and
the HBM limit of the K/V bytes read, in one run. Each call runs 48 times in a CUDA graph (as in a decode step; the
layers cycle over enough distinct K/V pools to defeat the 50 MB L2), timed per layer.

    PYTHONPATH=. python3 benchmarks/h200/paged_sweep.py [--batches 1,8,64,128] [--contexts 160,1024,4096]
        [--out benchmarks/results/paged-decode-h200.json]

Prints a table (ours, best variant, limit) and writes JSON with the machine and this command.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from graph_timing import graph_us, write_json  # noqa: E402 -- benchmarks/h200, the script's own folder
from moemesh.runtime.gpu import paged_attention as pa  # noqa: E402

LAYERS = 48
HQ, HKV, D, BS = 32, 4, 128, 16
BANDWIDTH = 4.22e12  # bytes/s, FACTS.md's measured H200 copy bandwidth
VARIANTS = [(s, n, w) for s in (1, 2, 4, 8, 16) for n in (32, 64, 128) for w in (4, 8)]


def case(batch: int, context: int) -> tuple[list, dict]:
    """Distinct per-layer (q, K pool, V pool, tables) sets, enough that their K/V exceed L2 several times over."""
    blocks = batch * triton.cdiv(context, BS)
    kv_bytes = 2 * blocks * BS * HKV * D * 2
    distinct = max(1, min(LAYERS, -(-400_000_000 // kv_bytes)))
    sets = []
    for _ in range(distinct):
        pools = torch.randn(2, blocks * BS, HKV, D, device="cuda", dtype=torch.bfloat16)
        tables = torch.randperm(blocks, device="cuda", dtype=torch.int32).view(batch, -1)  # [B, W]
        sets.append((torch.randn(batch, HQ, D, device="cuda", dtype=torch.bfloat16), pools, tables))
    lens = torch.full((batch,), context, device="cuda", dtype=torch.int32)
    return sets, {"lens": lens, "limit_us": round(batch * context * HKV * D * 2 * 2 / BANDWIDTH * 1e6, 2)}


def time_variant(sets, lens, splits, block_n, warps) -> float:
    def fn(i):
        q, pools, tables = sets[i % len(sets)]
        pa.paged_decode_attention(q, pools[0], pools[1], tables, lens, D ** -0.5, BS, block_n=block_n,
                                  splits=splits, num_warps=warps)
    return graph_us(fn, LAYERS, True, passes=1, warmup=5, rep=30)


def sweep(batch: int, context: int) -> dict:
    sets, info = case(batch, context)
    q, pools, tables = sets[0]
    want = pa.paged_decode_attention(q, pools[0], pools[1], tables, info["lens"], D ** -0.5, BS, splits=1)
    ours = (pa.splits_for(batch, HKV), 64, 4)
    times = {}
    for v in dict.fromkeys([ours] + VARIANTS):
        try:
            got = pa.paged_decode_attention(q, pools[0], pools[1], tables, info["lens"], D ** -0.5, BS,
                                            block_n=v[1], splits=v[0], num_warps=v[2])
            assert (got.float() - want.float()).abs().max().item() < 2e-2, "differs from one split"
            times[v] = round(time_variant(sets, info["lens"], *v), 2)
        except Exception as exc:  # noqa: BLE001 -- a variant that fails is reported, the sweep goes on
            print(f"  {batch} x {context} {v}: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
    best = min(times, key=times.get)
    row = {"batch": batch, "context": context, "limit_us": info["limit_us"], "ours": list(ours),
           "ours_us": times.get(ours), "best": list(best), "best_us": times[best],
           "variants": {f"{s},{n},{w}": t for (s, n, w), t in times.items()}}
    print({k: v for k, v in row.items() if k != "variants"}, flush=True)
    del sets
    torch.cuda.empty_cache()
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,8,64,128")
    p.add_argument("--contexts", default="160,1024,4096")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/paged-decode-h200.json")
    args = p.parse_args()
    torch.manual_seed(0)
    rows = [sweep(b, c) for b in map(int, args.batches.split(",")) for c in map(int, args.contexts.split(","))]
    print("\n| batch | context | HBM limit us | ours us (splits, BLOCK_N, warps) | best us | % of limit (ours / best) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['context']} | {r['limit_us']} | {r['ours_us']} {tuple(r['ours'])} | "
              f"{r['best_us']} {tuple(r['best'])} | {100 * r['limit_us'] / (r['ours_us'] or 1e9):.0f}% / "
              f"{100 * r['limit_us'] / r['best_us']:.0f}% |")
    write_json(args.out, layers=LAYERS, heads=[HQ, HKV, D], kv_block=BS, rows=rows)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
