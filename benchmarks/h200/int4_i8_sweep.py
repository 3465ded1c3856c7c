"""Tile sweep of the int4 grouped GEMM on int8 tensor cores (config key I8, int4_dp4a._int4_mac_i8) against the int4
table's current configs and, up to 32 tokens, the dp4a GEMV; Qwen3-30B-A3B's expert shape (E 128, top-8, H 2048,
I 768), 12 layers of distinct weights in one CUDA graph (graph_timing.graph_us), us per layer.

    PYTHONPATH=. python3 benchmarks/h200/int4_i8_sweep.py [--tokens 16,24,32,64,128,256,1024] [--stages 3,4]
        [--write] [--out DIR]

Each kind (gate_up, down) is swept with the other kind at its table config, so a row's difference is that kernel's.
--write: each table entry whose token count was timed takes the best I8 config of each kind where it beats the
table's by more than 3%, and the GEMV's MAX_PAIRS becomes top-k x the largest count up to which the GEMV beat the
best GEMM at every count timed. Writes int4-i8-sweep-h200.json (machine, command, rows) to --out; prints a table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from graph_timing import graph_us, expert_layers, write_json  # noqa: E402 -- benchmarks/h200, this folder
from moemesh.runtime.gpu import fused_moe as fm  # noqa: E402
from moemesh.runtime.gpu import pdl  # noqa: E402

E, I, H, K, LAYERS = 128, 768, 2048, 8, 12
KINDS = ("gate_up", "down")


def candidates(tokens: int, stages: tuple[int, ...] = (3,)) -> list[dict]:
    """I8 tiles worth timing at this token count (row blocks no taller than the rows an expert may get)."""
    rows = (16, 32) if tokens <= 32 else (16, 32, 64) if tokens <= 256 else (64, 128)
    return [{"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": 128, "GROUP_M": 1 if tokens <= 128 else 8, "num_warps": w,
             "num_stages": s, "MAGIC": False, "I8": True}
            for m, n, w, s in itertools.product(rows, (64, 128, 256), (4, 8), stages)]


def sweep(tokens: int, layers, stages: tuple[int, ...] = (3,)) -> dict:
    ids = torch.stack([torch.randperm(E, device="cuda")[:K] for _ in range(tokens)]).long()  # [T, K]
    w = torch.rand(tokens, K, device="cuda").softmax(-1)
    x = torch.randn(tokens, H, device="cuda", dtype=torch.bfloat16)
    base = tuple(fm.pick_config(tokens, kind, layers[0][0]) for kind in KINDS)

    def us(cfgs) -> float:
        try:
            return round(graph_us(lambda i: fm.fused_moe(x, *layers[i], ids, w, cfgs), LAYERS,
                                  tokens <= pdl.MAX_ROWS, passes=2), 2)
        except Exception as exc:  # a tile the GPU cannot run (shared memory): skipped, said
            print(f"  skipped {cfgs}: {str(exc).splitlines()[0][:100]}", flush=True)
            return float("inf")

    row = {"tokens": tokens, "table_us": us(base), "table": list(base)}
    best = list(base)
    for j, kind in enumerate(KINDS):
        timed = []
        for c in candidates(tokens, stages):
            cfgs = tuple(c if i == j else base[i] for i in range(2))
            timed.append((us(cfgs), c))
        t, c = min(timed, key=lambda tc: tc[0])
        row[f"{kind}_best_i8"], row[f"{kind}_best_i8_us"] = c, t  # with the other kind at its table config
        best[j] = c
    row["i8_us"] = us(tuple(best))
    ref, got = (fm.fused_moe(x, *layers[0], ids, w, cfgs) for cfgs in (base, tuple(best)))
    row["i8_rel_diff"] = float((got - ref).norm() / ref.norm())  # the activations' int8 rounding: ~1.6%
    if tokens * K <= 512:
        row["gemv_us"] = round(graph_us(lambda i: fm._fused_moe_gemv(x, *layers[i], ids, w), LAYERS,
                                        tokens <= pdl.MAX_ROWS, passes=2), 2)
    print({k: v for k, v in row.items() if not isinstance(v, (dict, list))}, flush=True)
    return row


def write(rows: list[dict]) -> None:
    path = fm.CONFIG_DIR / fm.config_name(E, I, H, "int4", torch.cuda.get_device_name(0))
    table = json.loads(path.read_text())
    for r in rows:
        entry = table.get(str(r["tokens"]))
        if entry is None:
            continue
        for j, kind in enumerate(KINDS):
            # the I8 tile wins this kind if the layer with it beats the table's by > 3%
            if r[f"{kind}_best_i8_us"] < 0.97 * r["table_us"]:
                entry[kind] = r[f"{kind}_best_i8"]
                print("wrote", r["tokens"], kind, entry[kind])
    pairs = 0
    for r in sorted(rows, key=lambda r: r["tokens"]):
        if "gemv_us" not in r or r["gemv_us"] >= min(r["i8_us"], r["table_us"]):
            break
        pairs = r["tokens"] * K
    if pairs:
        table[min(table, key=int)]["gemv_gate_up"]["MAX_PAIRS"] = pairs
        print("wrote MAX_PAIRS", pairs)
    path.write_text(json.dumps(table, indent=1) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="16,24,32,64,128,256,1024")
    p.add_argument("--write", action="store_true")
    p.add_argument("--stages", default="3", help="pipeline depths to sweep (comma-separated)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results")
    args = p.parse_args()
    layers = expert_layers(E, I, H, LAYERS)
    stages = tuple(int(s) for s in args.stages.split(","))
    rows = [sweep(int(t), layers, stages) for t in args.tokens.split(",")]
    print("\n| tokens | table us | I8 us (best tiles) | GEMV us | gate_up I8 tile | down I8 tile |\n"
          "|---|---|---|---|---|---|")
    for r in rows:
        tiles = [f"{c['BLOCK_M']}x{c['BLOCK_N']} w{c['num_warps']} s{c['num_stages']}"
                 for c in (r["gate_up_best_i8"], r["down_best_i8"])]
        print(f"| {r['tokens']} | {r['table_us']} | {r['i8_us']} | {r.get('gemv_us', '')} | {tiles[0]} | {tiles[1]} |")
    if args.write:
        write(rows)
    write_json(args.out / "int4-i8-sweep-h200.json", rows=rows)


if __name__ == "__main__":
    main()
