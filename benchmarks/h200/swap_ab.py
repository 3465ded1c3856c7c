"""A/B of the swapped-operand MoE GEMM (gpu/moe_swap.py): this checkout's kernel against another version of the
file, same weights, same tiles (the tables' own), in one lease. Whole MoE layers of Qwen3-30B-A3B's expert shape
(E 128, top-8, H 2048, I 768), LAYERS layers of distinct weights in one CUDA graph, us per layer, beside the HBM limit
of the experts the step touches.

    git show REF:moemesh/runtime/gpu/moe_swap.py > OLD.py   # the version to compare against
    PYTHONPATH=. python3 benchmarks/h200/swap_ab.py --old OLD.py [--schemes int4,int8] [--tokens 24,32,64,128]
        [--out DIR]

Both versions' outputs are compared (relative error printed). Token counts the table does not send to the swap run
with its nearest entry's tiles. Writes moe-swap-ab-h200.json (machine, command, rows) to --out; prints a table.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from graph_timing import graph_us, moe_steps, write_json  # noqa: E402 -- benchmarks/h200, this folder
from moemesh.runtime.gpu import fused_moe as fm  # noqa: E402
from moemesh.runtime.gpu import moe_swap  # noqa: E402

E, I, H, K, LAYERS, COPY_BW = 128, 768, 2048, 8, 12, 4.22e12


def load_old(path: Path):
    spec = importlib.util.spec_from_file_location("moe_swap_old", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiles(tokens: int, w_gate_up) -> tuple[dict, dict]:
    """The table's swap tiles for this step, or its nearest swap entry's."""
    table = {m: e for m, e in fm._own_table(w_gate_up).items() if "swap_gate_up" in e}
    entry = table[min(table, key=lambda m: abs(m - tokens))]
    return entry["swap_gate_up"], entry["swap_down"]


def layer_us(layers, x, ids, w, module, cfgs) -> tuple[float, torch.Tensor]:
    """us per layer of fused_moe through `module`'s swapped GEMM with the tiles cfgs (the GEMV bypassed)."""
    saved = fm.moe_swap, fm.swap_configs, fm.gemv_max_pairs
    fm.moe_swap, fm.swap_configs, fm.gemv_max_pairs = module, (lambda t, wgu: cfgs), (lambda wgu: 0)
    try:
        out = fm.fused_moe(x, *layers[0], ids, w)
        return graph_us(lambda i: fm.fused_moe(x, *layers[i], ids, w), len(layers)), out
    finally:
        fm.moe_swap, fm.swap_configs, fm.gemv_max_pairs = saved


def compare(scheme: str, tokens: list[int], old) -> list[dict]:
    rows = []
    for layers, t, x, w, ids, limit in moe_steps(scheme, tokens, (E, I, H, K), LAYERS, COPY_BW):
        cfgs = tiles(t, layers[0][0])
        old_us, want = layer_us(layers, x, ids, w, old, cfgs)
        new_us, got = layer_us(layers, x, ids, w, moe_swap, cfgs)
        row = {"scheme": scheme, "tokens": t, "hbm_limit_us": round(limit, 1), "old_us": round(old_us, 1),
               "new_us": round(new_us, 1), "rel_diff": ((got - want).norm() / want.norm()).item(),
               "gate_up": cfgs[0], "down": cfgs[1]}
        rows.append(row)
        print(row, flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", type=Path, required=True, help="the other version of moe_swap.py")
    ap.add_argument("--schemes", default="int4,int8")
    ap.add_argument("--tokens", default="24,32,64,128")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    old = load_old(args.old)
    tokens = [int(t) for t in args.tokens.split(",")]
    rows = [r for s in args.schemes.split(",") for r in compare(s, tokens, old)]
    print("\n| scheme | tokens | HBM limit us | old us | new us | speedup | % of HBM limit (new) | rel diff |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['scheme']} | {r['tokens']} | {r['hbm_limit_us']} | {r['old_us']} | {r['new_us']} | "
              f"{r['old_us'] / r['new_us']:.2f}x | {100 * r['hbm_limit_us'] / r['new_us']:.0f}% | "
              f"{r['rel_diff']:.1e} |")
    write_json(args.out / "moe-swap-ab-h200.json", layers=LAYERS, old=str(args.old), rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
