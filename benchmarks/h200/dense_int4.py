"""The attention projections of a decode step with int4 weights (one int4 "expert" through fused_moe.moe_gemv, on
dp4a) against bf16 (dense_gemv.norm_linear + linear): Qwen3-30B-A3B's shapes (q/k/v [5120, 2048] with the input
norm, o [2048, 4096]), 12 layers of distinct weights in one CUDA graph (graph_timing.graph_us), us per layer.

    PYTHONPATH=. python3 benchmarks/h200/dense_int4.py [--rows 1,2] [--out DIR]

Measured 2026-11-30 (us per layer, bf16 -> int4): 1 row 16.0 -> 11.9, 2 rows 21.4 -> 13.4, 8 rows 20.9 -> 24.3; in
the engine the batch-1 step gained only 0.05 ms of 1.95, so int4 attention was dropped (see quant.py's module doc).

int4 at a row count: add_rms_norm + the q/k/v GEMV + the o GEMV, each GEMV swept over tiles (BLOCK_N x BLOCK_K x
warps, dp4a with an activation step per 32 columns); bf16: the tuned dense GEMVs as the engine runs them. Prints a
table; writes dense-int4-h200.json (machine, command, rows) to --out.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from graph_timing import graph_us, write_json  # noqa: E402 -- benchmarks/h200, the script's own folder
from moemesh.runtime.gpu import dense_gemv, fused_ops, pdl  # noqa: E402
from moemesh.runtime.gpu import fused_moe as fm  # noqa: E402
from moemesh.runtime.quant import quantize  # noqa: E402

H, QKV, O_IN, LAYERS = 2048, 5120, 4096, 12


def tiles() -> list[dict]:
    return [{"BLOCK_N": n, "BLOCK_K": k, "num_warps": w, "num_stages": 2, "UNROLL": True, "WORDS": True, "DP4A": 32}
            for n, k, w in itertools.product((4, 8, 16, 32), (512, 1024, 2048), (2, 4, 8)) if n * k <= 32768]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,2")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results")
    args = p.parse_args()
    bf = [(torch.randn(QKV, H, device="cuda", dtype=torch.bfloat16) / 45,
           torch.randn(H, O_IN, device="cuda", dtype=torch.bfloat16) / 64) for _ in range(LAYERS)]
    q4 = [tuple(quantize(w[None], "int4") for w in pair) for pair in bf]  # [1, N, K]: one "expert"
    nw = torch.ones(H, device="cuda", dtype=torch.bfloat16)
    rows = []
    for t in (int(v) for v in args.rows.split(",")):
        x, d = (torch.randn(t, H, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        o_in = torch.randn(t, O_IN, device="cuda", dtype=torch.bfloat16)
        ids = torch.zeros(t, dtype=torch.long, device="cuda")
        y_qkv = torch.empty(t, QKV, device="cuda", dtype=torch.bfloat16)
        y_o = torch.empty(t, H, device="cuda", dtype=torch.bfloat16)
        use_pdl = t <= pdl.MAX_ROWS

        def time(fn) -> float:
            return round(graph_us(fn, LAYERS, use_pdl, passes=2), 2)

        row = {"rows": t, "bf16_qkv_norm_us": time(lambda i: dense_gemv.norm_linear(x, d, nw, 1e-6, bf[i][0])),
               "bf16_o_us": time(lambda i: dense_gemv.linear(o_in, bf[i][1])),
               "norm_us": time(lambda i: fused_ops.add_rms_norm(x, d, nw, 1e-6))}
        for name, a, out, j in (("qkv", x, y_qkv, 0), ("o", o_in, y_o, 1)):
            timed = [(time(lambda i, c=c: fm.moe_gemv(a, q4[i][j], out, ids, 1, c)), c) for c in tiles()]
            us, cfg = min(timed, key=lambda tc: tc[0])
            row[f"int4_{name}_us"], row[f"int4_{name}_cfg"] = us, cfg
            ref = a.float() @ q4[0][j].dequantize(torch.float32)[0].T
            fm.moe_gemv(a, q4[0][j], out, ids, 1, cfg)
            row[f"int4_{name}_rel_diff"] = float((out.float() - ref).norm() / ref.norm())
        row["bf16_us"] = round(row["bf16_qkv_norm_us"] + row["bf16_o_us"], 2)
        row["int4_us"] = round(row["norm_us"] + row["int4_qkv_us"] + row["int4_o_us"], 2)
        print({k: v for k, v in row.items() if not isinstance(v, dict)}, flush=True)
        rows.append(row)
    print("\n| rows | bf16 q/k/v+norm | bf16 o | bf16 sum | norm | int4 q/k/v | int4 o | int4 sum | "
          "tiles (q/k/v; o) |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        tl = "; ".join(f"{c['BLOCK_N']}x{c['BLOCK_K']} w{c['num_warps']}" for c in (r["int4_qkv_cfg"], r["int4_o_cfg"]))
        print(f"| {r['rows']} | {r['bf16_qkv_norm_us']} | {r['bf16_o_us']} | {r['bf16_us']} | {r['norm_us']} | "
              f"{r['int4_qkv_us']} | {r['int4_o_us']} | {r['int4_us']} | {tl} |")
    write_json(args.out / "dense-int4-h200.json", rows=rows)


if __name__ == "__main__":
    main()
