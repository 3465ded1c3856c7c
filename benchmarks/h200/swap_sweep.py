"""Tile sweep of the swapped-operand GEMM for 8-bit experts (gpu/moe_swap.py) against fused_moe's GEMM on the same
weights, one run: Qwen3-30B-A3B's expert shape (E 128, top-8, H 2048, I 768), LAYERS layers of distinct weights in
one CUDA graph (graph_timing.graph_us), whole MoE layers (align, both GEMMs, the slot sum), us per layer, beside the
HBM limit of the experts the step touches (their 8-bit bytes / the copy bandwidth).

    PYTHONPATH=. python3 benchmarks/h200/swap_sweep.py [--schemes fp8,int8] [--tokens 8,16,32,64,128,256,512]
        [--per-kind] [--maxnreg 96,80]
        [--write] [--out DIR]

Every config's output is checked against fused_moe without the swap (its GEMV or GEMM; relative error < 1e-3, or
2e-2 for int4, whose dp4a GEMV and int8-tensor-core GEMM round the activations to int8; else the config is refused).
--write: the weights' table (configs/E=...,dtype=float8_e4m3fn|int8|int4,...json) gets "swap_gate_up" / "swap_down"
entries at each token count timed where the best swap config beat what fused_moe runs without it by more than 3%,
and "swap": false where it did not (a larger count's entry then stops there); in the int4 table the dp4a GEMV's
MAX_PAIRS becomes top-k x the largest count timed below the swap's first win (run it after int4_gemv_gemm.py /
int4_i8_sweep.py, which set MAX_PAIRS without the swap). Writes moe-swap-h200.json (machine, command, rows) to
--out; prints a table.
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

from graph_timing import graph_us, moe_steps, write_json  # noqa: E402 -- benchmarks/h200, this folder
from moemesh.runtime.gpu import fused_moe as fm  # noqa: E402

E, I, H, K, LAYERS, COPY_BW = 128, 768, 2048, 8, 12, 4.22e12


def candidates(tokens: int, scheme: str, maxnreg: tuple = (None,)) -> list[dict]:
    """Row blocks no taller than about twice the rows an expert gets at this step, and 8 rows always (Triton 3.6 gives
    8-row blocks mma.sync with the weights loaded four bytes a register; 16 and more rows take wgmma, whose register
    operand it loads two bytes at a time: sm_90 SASS of fp8 at BM 16 has 77 shared loads per K step against 19 at
    BM 8, sass_loops.py); 4 warps (one warpgroup); int4
    steps one or two 128-column packing blocks at a time (BLOCK_K 128 / 256). maxnreg: register caps to try (None:
    the compiler's choice), for more programs per SM."""
    per_expert = tokens * K / E
    rows = sorted({8, *[m for m in (8, 16, 32, 64) if m <= max(8, 2 * per_expert)][-2:]})
    return [{"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "num_warps": 4, "num_stages": s, **({"maxnreg": r} if r else {})}
            for m, n, k, s, r in itertools.product(rows, (64, 128), (128, 256), (3, 4), maxnreg)]


def layer_us(layers, x, ids, w, swap: dict | None, swap_down: dict | None = None) -> tuple[float, torch.Tensor]:
    """us per layer of fused_moe over the layers, with the swap config (both GEMMs, or gate_up with swap_down for
    down; the GEMV bypassed) or what fused_moe runs without the swap (its GEMV, or its GEMM with the tables')."""
    originals = fm.swap_configs, fm.gemv_max_pairs
    fm.swap_configs = (lambda tokens, wgu: (swap, swap_down or swap)) if swap else (lambda tokens, wgu: None)
    if swap:
        fm.gemv_max_pairs = lambda wgu: 0
    try:
        out = fm.fused_moe(x, *layers[0], ids, w)
        return graph_us(lambda i: fm.fused_moe(x, *layers[i], ids, w), len(layers)), out
    finally:
        fm.swap_configs, fm.gemv_max_pairs = originals


def kind_candidates(tokens: int, joint: dict) -> list[dict]:
    """--per-kind: wider tiles for one GEMM with the other at the joint sweep's best (8 warps, 256 columns), at the
    joint best's BLOCK_K and stages."""
    rows = sorted({8, *[m for m in (8, 16, 32, 64) if m <= max(8, 2 * tokens * K / E)][-2:]})  # as candidates
    return [{"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": joint["BLOCK_K"], "num_warps": wp,
             "num_stages": joint["num_stages"], **({"maxnreg": joint["maxnreg"]} if "maxnreg" in joint else {})}
            for m, n, wp in itertools.product(rows, (64, 128, 256), (4, 8))]


def per_kind(layers, x, ids, w, want, joint: tuple, scheme: str, t: int) -> tuple:
    """(us, gate_up config, down config): down swept with gate_up at the joint best, then gate_up with that down."""
    best = (joint[0], joint[1], joint[1])
    for kind in ("down", "gate_up"):
        for cfg in kind_candidates(t, joint[1]):
            up, down = (best[1], cfg) if kind == "down" else (cfg, best[2])
            try:
                us, got = layer_us(layers, x, ids, w, up, down)
            except Exception as e:  # noqa: BLE001 -- a tile the GPU refuses: skip it, say why
                print(f"  {scheme} {t} {kind} {cfg}: {str(e)[-120:]}", flush=True)
                continue
            if ((got - want).norm() / want.norm()).item() < (2e-2 if scheme == "int4" else 1e-3) and us < best[0]:
                best = (us, up, down)
    return best


def sweep(scheme: str, tokens: list[int], kinds: bool = False, maxnreg: tuple = (None,)) -> list[dict]:
    rows = []
    for layers, t, x, w, ids, limit in moe_steps(scheme, tokens, (E, I, H, K), LAYERS, COPY_BW):
        base_us, want = layer_us(layers, x, ids, w, None)
        best = None
        for cfg in candidates(t, scheme, maxnreg):
            try:
                us, got = layer_us(layers, x, ids, w, cfg)
            except Exception as e:  # noqa: BLE001 -- a tile the GPU refuses (shared memory): skip it, say why
                print(f"  {scheme} {t} {cfg}: {str(e)[-120:]}", flush=True)
                continue
            err = ((got - want).norm() / want.norm()).item()
            if err < (2e-2 if scheme == "int4" else 1e-3) and (best is None or us < best[0]):
                best = (us, cfg, err)
        row = {"scheme": scheme, "tokens": t, "hbm_limit_us": round(limit, 1), "fused_moe_gemm_us": round(base_us, 1),
               "swap_us": round(best[0], 1) if best else None, "swap_config": best and best[1],
               "swap_rel_err": best and best[2]}
        if kinds and best:  # the joint best, then each GEMM's own tile (swap_up_config / swap_down_config)
            us, up, down = per_kind(layers, x, ids, w, want, best, scheme, t)
            row.update(swap_joint_us=row["swap_us"], swap_us=round(us, 1), swap_up_config=up, swap_down_config=down)
        rows.append(row)
        print(row, flush=True)
    return rows


def write_table(scheme: str, rows: list[dict]) -> Path:
    """Swap entries where the swap won by more than 3%, removed where it did not (the token counts timed)."""
    dtype = {"fp8": torch.float8_e4m3fn, "int8": torch.int8, "int4": "int4"}[scheme]
    path = fm.CONFIG_DIR / fm.config_name(E, I, H, dtype, torch.cuda.get_device_name())
    table = json.loads(path.read_text()) if path.is_file() else {}
    for r in rows:
        entry = table.setdefault(str(r["tokens"]), {})
        won = r["swap_us"] is not None and r["swap_us"] < 0.97 * r["fused_moe_gemm_us"]
        entry.pop("swap", None)
        if not won:  # marks the count, so that a larger count's swap entry does not reach down to it
            entry["swap"] = False
        for kind in ("swap_gate_up", "swap_down"):
            entry.pop(kind, None)
            if won:  # --per-kind rows carry each GEMM's own tile
                entry[kind] = r.get("swap_down_config" if kind == "swap_down" else "swap_up_config", r["swap_config"])
    table = {m: e for m, e in sorted(table.items(), key=lambda kv: int(kv[0])) if e}
    gemv = table[min(table, key=int)].get("gemv_gate_up", {}) if table else {}
    won = [r["tokens"] for r in rows if "swap_gate_up" in table.get(str(r["tokens"]), {})]
    below = [r["tokens"] for r in rows if won and r["tokens"] < min(won)]
    if scheme == "int4" and below and "MAX_PAIRS" in gemv:  # the dp4a GEMV keeps the steps below the swap's first win
        gemv["MAX_PAIRS"] = K * max(below)
        print("wrote MAX_PAIRS", gemv["MAX_PAIRS"])
    path.write_text(json.dumps(table, indent=1) + "\n")
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schemes", default="fp8,int8")
    ap.add_argument("--tokens", default="8,16,32,64,128,256,512")
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--per-kind", action="store_true", help="then sweep each GEMM's tile with the other's fixed")
    ap.add_argument("--maxnreg", default="", help="register caps to try beside the compiler's choice, e.g. 96,80")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    tokens = [int(t) for t in args.tokens.split(",")]
    caps = (None,) + tuple(int(r) for r in args.maxnreg.split(",") if r)
    rows = [r for s in args.schemes.split(",") for r in sweep(s, tokens, args.per_kind, caps)]
    print("\n| scheme | tokens | HBM limit us | fused_moe GEMM us | swap us | speedup | % of HBM limit (swap) "
          "| config |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        sw = r["swap_us"]
        print(f"| {r['scheme']} | {r['tokens']} | {r['hbm_limit_us']} | {r['fused_moe_gemm_us']} | {sw} | "
              f"{r['fused_moe_gemm_us'] / sw:.2f}x | {100 * r['hbm_limit_us'] / sw:.0f}% | {r['swap_config']} |"
              if sw else f"| {r['scheme']} | {r['tokens']} | {r['hbm_limit_us']} | {r['fused_moe_gemm_us']} | - |")
    write_json(args.out / "moe-swap-h200.json", layers=LAYERS, rows=rows)
    if args.write:
        for s in args.schemes.split(","):
            print("wrote", write_table(s, [r for r in rows if r["scheme"] == s]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
