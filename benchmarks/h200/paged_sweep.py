"""Paged decode attention (Qwen3-30B-A3B's 32 q / 4 kv heads of 128, KV blocks of 16 tokens) over batch x context:
what paged_attention runs today (its splits_for and BLOCK_N) beside every (splits, BLOCK_N, num_warps) variant and
the HBM limit of the K/V bytes read, in one run. Each call runs 48 times in a CUDA graph (as in a decode step; the
layers cycle over enough distinct K/V pools to defeat the 50 MB L2), timed per layer. `--kv bf16,fp8` adds rows of
e4m3 pools (kv_cache_dtype "fp8": one byte per value, its own HBM limit); `--quick` times ours and the BLOCK_N /
warps variants at our splits only.

    PYTHONPATH=. python3 benchmarks/h200/paged_sweep.py [--batches 1,8,64,128] [--contexts 160,1024,4096]
        [--kv bf16,fp8] [--quick] [--out benchmarks/results/paged-decode-h200.json]

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
from moemesh.runtime.kv_cache import FP8, narrow, to_token_minor  # noqa: E402

LAYERS = 48
HQ, HKV, D, BS = 32, 4, 128, 16
BANDWIDTH = 4.22e12  # bytes/s, FACTS.md's measured H200 copy bandwidth
VARIANTS = [(s, n, w, g) for s in (1, 2, 4, 8, 16) for n in (32, 64, 128) for w in (4, 8) for g in (1, 2, 3)]


def case(batch: int, context: int, kv: str) -> tuple[list, dict]:
    """Distinct per-layer (q, K pool, V pool, tables) sets, enough that their K/V exceed L2 several times over."""
    blocks = batch * triton.cdiv(context, BS)
    size = 1 if kv == "fp8" else 2  # bytes per cached value
    kv_bytes = 2 * blocks * BS * HKV * D * size
    distinct = max(1, min(LAYERS, -(-400_000_000 // kv_bytes)))
    sets = []
    for _ in range(distinct):
        pools = torch.randn(2, blocks * BS, HKV, D, device="cuda", dtype=torch.bfloat16)
        if kv == "fp8":  # K [slots, Hkv, D], V [blocks, Hkv, D, BS] (kv_cache.py's fp8 pools)
            pools = narrow(pools, FP8).view(torch.uint8)
            pools = (pools[0].view(FP8), to_token_minor(pools[1], BS).view(FP8))
        tables = torch.randperm(blocks, device="cuda", dtype=torch.int32).view(batch, -1)  # [B, W]
        sets.append((torch.randn(batch, HQ, D, device="cuda", dtype=torch.bfloat16), pools, tables))
    lens = torch.full((batch,), context, device="cuda", dtype=torch.int32)
    return sets, {"lens": lens, "limit_us": round(batch * context * HKV * D * 2 * size / BANDWIDTH * 1e6, 2)}


def time_variant(sets, lens, splits, block_n, warps, stages) -> float:
    def fn(i):
        q, pools, tables = sets[i % len(sets)]
        pa.paged_decode_attention(q, pools[0], pools[1], tables, lens, D ** -0.5, BS, block_n=block_n,
                                  splits=splits, num_warps=warps, num_stages=stages)
    return graph_us(fn, LAYERS, True, passes=1, warmup=5, rep=30)


SPLITS: tuple[int, ...] = ()  # --splits: only these (empty: all)


def sweep(batch: int, context: int, kv: str, quick: bool) -> dict:
    sets, info = case(batch, context, kv)
    q, pools, tables = sets[0]
    want = pa.paged_decode_attention(q, pools[0], pools[1], tables, info["lens"], D ** -0.5, BS, splits=1)
    ours = (pa.splits_for(batch, HKV, programs=512 if kv == "fp8" else 1024), 64, 4, 2)
    times = {}
    variants = [v for v in VARIANTS if v[0] == ours[0]] if quick else VARIANTS
    variants = [v for v in variants if v[0] in SPLITS] if SPLITS else variants
    for v in dict.fromkeys([ours] + variants):
        try:
            got = pa.paged_decode_attention(q, pools[0], pools[1], tables, info["lens"], D ** -0.5, BS,
                                            block_n=v[1], splits=v[0], num_warps=v[2], num_stages=v[3])
            assert (got.float() - want.float()).abs().max().item() < 2e-2, "differs from one split"
            times[v] = round(time_variant(sets, info["lens"], *v), 2)
        except Exception as exc:  # noqa: BLE001 -- a variant that fails is reported, the sweep goes on
            print(f"  {batch} x {context} {v}: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
    best = min(times, key=times.get)
    row = {"kv": kv, "batch": batch, "context": context, "limit_us": info["limit_us"], "ours": list(ours),
           "ours_us": times.get(ours), "best": list(best), "best_us": times[best],
           "variants": {",".join(map(str, v)): t for v, t in times.items()}}
    print({k: v for k, v in row.items() if k != "variants"}, flush=True)
    del sets
    torch.cuda.empty_cache()
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,8,64,128")
    p.add_argument("--contexts", default="160,1024,4096")
    p.add_argument("--kv", default="bf16", help="cache dtypes, comma-separated: bf16, fp8")
    p.add_argument("--quick", action="store_true", help="only the variants at our splits")
    p.add_argument("--splits", default="", help="only these splits, comma-separated (default: all)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/paged-decode-h200.json")
    args = p.parse_args()
    global SPLITS
    SPLITS = tuple(int(x) for x in args.splits.split(",") if x)
    torch.manual_seed(0)
    rows = [sweep(b, c, kv, args.quick) for b in map(int, args.batches.split(","))
            for c in map(int, args.contexts.split(",")) for kv in args.kv.split(",")]
    print("\n| KV | batch | context | HBM limit us | ours us (splits, BLOCK_N, warps, stages) | best us | % of limit (ours / best) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kv']} | {r['batch']} | {r['context']} | {r['limit_us']} | {r['ours_us']} {tuple(r['ours'])} | "
              f"{r['best_us']} {tuple(r['best'])} | {100 * r['limit_us'] / (r['ours_us'] or 1e9):.0f}% / "
              f"{100 * r['limit_us'] / r['best_us']:.0f}% |")
    write_json(args.out, layers=LAYERS, heads=[HQ, HKV, D], kv_block=BS, rows=rows)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
