"""Which int4 MoE path at which token count: the GEMV (one program per pair and column block, dp4a), int4_rows.py
(each expert's weights once for its pairs, dp4a) and the grouped GEMM, all timed at each token count, Qwen3-30B-A3B's
expert shape (E 128, top-8, H 2048, I 768), 12 layers of distinct weights in one CUDA graph (PDL up to pdl.MAX_ROWS
tokens, as the decode graphs run), us per layer.

    PYTHONPATH=. python3 benchmarks/h200/int4_gemv_gemm.py [--tokens 1,4,8,16,24,32,48,64,96,128] [--write] [--out DIR]

First int4_rows' block shapes are swept at --sweep-tokens (64) kernel by kernel. --write: the int4 table's first
entry gets the best rows configs, the GEMV's MAX_PAIRS = top-k x the largest token count up to which the GEMV was the
fastest path at every count timed (fused_moe.gemv_max_pairs), and rows_gate_up's MAX_PAIRS likewise for the rows
path after that (fused_moe.rows_configs). Writes int4-gemv-gemm-h200.json (machine, command, sweep, rows) to --out
and prints a table, with each path's relative difference from the GEMM's output (the dp4a paths round activations to
int8 per 32 columns; the GEMM does not).
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
from pathlib import Path

import torch
import triton

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from graph_timing import graph_us  # noqa: E402 -- benchmarks/h200, the script's own folder
from moemesh.runtime.gpu import fused_moe as fm  # noqa: E402
from moemesh.runtime.gpu import int4_rows, pdl  # noqa: E402
from moemesh.runtime.gpu.moe_align import align_small  # noqa: E402
from moemesh.runtime.quant import quantize  # noqa: E402

E, I, H, K, LAYERS = 128, 768, 2048, 8, 12


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="1,4,8,16,24,32,48,64,96,128")
    p.add_argument("--sweep-tokens", type=int, default=64)
    p.add_argument("--write", action="store_true")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results")
    args = p.parse_args()
    layers = [(quantize(torch.randn(E, 2 * I, H, device="cuda", dtype=torch.bfloat16) / 45, "int4"),
               quantize(torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16) / 28, "int4"))
              for _ in range(LAYERS)]
    sweep, rows_cfgs = sweep_rows(layers, args.sweep_tokens)
    rows = []
    for t in (int(v) for v in args.tokens.split(",")):
        ids = torch.stack([torch.randperm(E, device="cuda")[:K] for _ in range(t)]).long()  # [T, K]
        w = torch.rand(t, K, device="cuda").softmax(-1)
        x = torch.randn(t, H, device="cuda", dtype=torch.bfloat16)
        cfgs = tuple(fm.pick_config(t, kind, layers[0][0]) for kind in ("gate_up", "down"))
        paths = {"gemm": lambda i: fm.fused_moe(x, *layers[i], ids, w, cfgs),  # configs given: never the GEMV
                 "gemv": lambda i: fm._fused_moe_gemv(x, *layers[i], ids, w),
                 "rows": lambda i: fm._fused_moe_rows(x, *layers[i], ids, w, rows_cfgs)}
        row = {"tokens": t, "pairs": t * K}
        ref = paths["gemm"](0)
        for name, fn in paths.items():
            row[f"{name}_us"] = round(graph_us(fn, LAYERS, t <= pdl.MAX_ROWS, passes=2), 2)
            row[f"{name}_rel_diff"] = float((fn(0) - ref).norm() / ref.norm())
        rows.append(row)
        print(row, flush=True)
    print("\n| tokens | pairs | GEMM us | GEMV us | rows us | fastest |\n|---|---|---|---|---|---|")
    for r in rows:
        best = min(("gemm", "gemv", "rows"), key=lambda n: r[f"{n}_us"])
        print(f"| {r['tokens']} | {r['pairs']} | {r['gemm_us']} | {r['gemv_us']} | {r['rows_us']} | {best} |")
    gemv_pairs, rows_pairs = _ranges(rows)
    print("GEMV fastest up to", gemv_pairs, "pairs; rows after that up to", rows_pairs)
    if args.write:
        _write(gemv_pairs, rows_pairs, rows_cfgs)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "int4-gemv-gemm-h200.json").write_text(json.dumps(
        {"machine": torch.cuda.get_device_name(), "host": platform.node(), "torch": torch.__version__,
         "triton": triton.__version__, "command": " ".join(["python3"] + sys.argv), "gemv_max_pairs": gemv_pairs,
         "rows_max_pairs": rows_pairs, "rows_configs": rows_cfgs, "sweep": sweep, "rows": rows}, indent=1) + "\n")


def sweep_rows(layers, t: int) -> tuple[list, tuple[dict, dict]]:
    """int4_rows' gate_up and down launches timed alone at t tokens over a grid of block shapes: (rows, best)."""
    ids = torch.stack([torch.randperm(E, device="cuda")[:K] for _ in range(t)]).long()
    x = torch.randn(t, H, device="cuda", dtype=torch.bfloat16)
    act = torch.randn(t * K, I, device="cuda", dtype=torch.bfloat16)
    out = torch.zeros(t, H, device="cuda")
    weights = torch.rand(t * K, device="cuda")
    found, best = [], {}
    for kind, bks in (("gate_up", (512, 1024)), ("down", (256, 512))):
        timed = []
        for bm, bn, bk, warps in itertools.product((8, 16), (16, 32, 64), bks, (4,)):
            cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps, "num_stages": 2, "DP4A": 32}
            al = align_small(ids, E, bm)
            if kind == "gate_up":
                def fn(i, cfg=cfg, al=al):
                    int4_rows.launch(x, layers[i][0], act, out, al, K, cfg, up_rows=I, pdl_args=pdl.launch())
            else:
                def fn(i, cfg=cfg, al=al):
                    int4_rows.launch(act, layers[i][1], out, weights, al, 1, cfg, weighted=True, sum_slots=K,
                                     pdl_args=pdl.launch())
            try:
                us = graph_us(fn, LAYERS, False, passes=2)
            except Exception as exc:  # noqa: BLE001 -- a shape that does not compile or fit: skip it
                print("skip", kind, cfg, type(exc).__name__, flush=True)
                continue
            timed.append((us, cfg))
            found.append({"kind": kind, "tokens": t, "us": round(us, 2), **cfg})
        timed.sort(key=lambda x: x[0])
        for us, cfg in timed[:4]:
            print(f"rows {kind} at {t} tokens: {us:.2f} us {cfg}", flush=True)
        best[kind] = timed[0][1]
    return found, (best["gate_up"], best["down"])


def _ranges(rows: list) -> tuple[int, int]:
    """(GEMV pairs, rows pairs): the GEMV while fastest from the smallest count, then rows while faster than GEMM."""
    gemv = rows_pairs = 0
    it = iter(rows)
    for r in it:
        if r["gemv_us"] > min(r["gemm_us"], r["rows_us"]):
            if r["rows_us"] < r["gemm_us"]:
                rows_pairs = r["pairs"]
            break
        gemv = r["pairs"]
    for r in it:
        if r["rows_us"] >= r["gemm_us"]:
            break
        rows_pairs = r["pairs"]
    return gemv, rows_pairs


def _write(gemv_pairs: int, rows_pairs: int, rows_cfgs: tuple[dict, dict]) -> None:
    name = fm.config_name(E, I, H, "int4", torch.cuda.get_device_name(0))
    path = fm.CONFIG_DIR / name
    table = json.loads(path.read_text())
    first = table[min(table, key=int)]  # where the GEMV configs come from (fused_moe.pick_config)
    if gemv_pairs:
        first["gemv_gate_up"]["MAX_PAIRS"] = gemv_pairs
    if rows_pairs:
        first["rows_gate_up"] = {**rows_cfgs[0], "MAX_PAIRS": rows_pairs}
        first["rows_down"] = rows_cfgs[1]
    path.write_text(json.dumps(table, indent=1) + "\n")
    print("wrote", path.name, {k: first.get(k) for k in ("gemv_gate_up", "rows_gate_up", "rows_down")})


if __name__ == "__main__":
    main()
