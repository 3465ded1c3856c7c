"""Where the int4 MoE layer should switch from the GEMV (one program per pair and column block, dp4a) to the grouped
GEMM: both timed at each token count, Qwen3-30B-A3B's expert shape (E 128, top-8, H 2048, I 768), 12 layers of
distinct weights in one CUDA graph (PDL up to pdl.MAX_ROWS tokens, as the decode graphs run), us per layer.

    PYTHONPATH=. python3 benchmarks/h200/int4_gemv_gemm.py [--tokens 1,4,8,16,24,32,48,64] [--write] [--out DIR]

--write: the int4 table's GEMV entry gets MAX_PAIRS = top-k x the largest token count up to which the GEMV was faster
at every count timed (fused_moe.gemv_max_pairs reads it). Writes int4-gemv-gemm-h200.json (machine, command, rows)
to --out and prints a table. Also reports the relative difference of the paths' outputs (the GEMV rounds
activations to int8 when its config says DP4A; the GEMM does not), and times the GEMM on int8 tensor cores (I8,
int4_dp4a._int4_mac_i8) on the same tiles beside them (int4_i8_sweep.py tunes its tiles).
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="1,4,8,16,24,32,48,64")
    p.add_argument("--write", action="store_true")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results")
    args = p.parse_args()
    layers = expert_layers(E, I, H, LAYERS)
    rows = []
    for t in (int(v) for v in args.tokens.split(",")):
        ids = torch.stack([torch.randperm(E, device="cuda")[:K] for _ in range(t)]).long()  # [T, K]
        w = torch.rand(t, K, device="cuda").softmax(-1)
        x = torch.randn(t, H, device="cuda", dtype=torch.bfloat16)
        cfgs = tuple(fm.pick_config(t, kind, layers[0][0]) for kind in ("gate_up", "down"))
        i8 = tuple({**c, "I8": True} for c in cfgs)  # the candidate: int8 tensor cores (int4_dp4a._int4_mac_i8)
        paths = {"gemm": lambda i: fm.fused_moe(x, *layers[i], ids, w, cfgs),  # configs given: never the GEMV
                 "gemv": lambda i: fm._fused_moe_gemv(x, *layers[i], ids, w),
                 "gemm_i8": lambda i: fm.fused_moe(x, *layers[i], ids, w, i8)}
        us = {name: round(graph_us(fn, LAYERS, t <= pdl.MAX_ROWS, passes=2), 2) for name, fn in paths.items()}
        a, b, c = (paths[n](0) for n in ("gemm", "gemv", "gemm_i8"))
        rows.append({"tokens": t, "pairs": t * K, "gemm_us": us["gemm"], "gemv_us": us["gemv"],
                     "gemm_i8_us": us["gemm_i8"], "rel_diff": float((a - b).norm() / a.norm()),
                     "i8_rel_diff": float((a - c).norm() / a.norm())})
        print(rows[-1], flush=True)
    print("\n| tokens | pairs | GEMM us | GEMV us | GEMM I8 us | GEMV or GEMM | GEMV diff | I8 diff |\n"
          "|---|---|---|---|---|---|---|---|")
    for r in rows:
        best = "GEMV" if r["gemv_us"] < r["gemm_us"] else "GEMM"
        print(f"| {r['tokens']} | {r['pairs']} | {r['gemm_us']} | {r['gemv_us']} | {r['gemm_i8_us']} | {best} | "
              f"{r['rel_diff']:.1e} | {r['i8_rel_diff']:.1e} |")
    pairs = 0
    for r in rows:  # the GEMV's range: from the smallest count up to the first where the GEMM wins
        if r["gemv_us"] >= r["gemm_us"]:
            break
        pairs = r["pairs"]
    print("GEMV faster up to", pairs, "pairs")
    if args.write and pairs:
        _write_max_pairs(layers[0][0], pairs)
    write_json(args.out / "int4-gemv-gemm-h200.json", gemv_faster_up_to_pairs=pairs, rows=rows)


def _write_max_pairs(w, pairs: int) -> None:
    name = fm.config_name(E, I, H, "int4", torch.cuda.get_device_name(0))
    path = fm.CONFIG_DIR / name
    table = json.loads(path.read_text())
    first = min(table, key=int)  # the entry the GEMV configs come from (fused_moe.pick_config)
    table[first]["gemv_gate_up"]["MAX_PAIRS"] = pairs
    path.write_text(json.dumps(table, indent=1) + "\n")
    print("wrote MAX_PAIRS", pairs, "into", path)


if __name__ == "__main__":
    main()
