"""The batch-1 decode step's small kernels as they are (Qwen3-30B-A3B shape: 32 q / 4 kv heads of 128, hidden 2048,
128 experts, top-8). Each runs 48 times in a row (a step has 48 layers, each with its own buffers) captured in one
CUDA graph with PDL on as in the batch-1 decode graph, so launch gaps are in; timed with triton.testing.do_bench of
the replay; printed per layer (graph time / 48).

    PYTHONPATH=. python3 benchmarks/h200/small_kernels.py [--contexts 130,2000] [--no-pdl] [--out FILE_OR_DIR]

  norm_rope   norm_rope.norm_rope_ (q/k RMSNorm + rope + K/V pool write; one program per head)
  attention   paged_attention.paged_decode_attention (+ its combine) at each context
  routing     fused_ops.route_softmax, router_logits_norm, and the two in a row (the decode step's router)
The variants these replaced, measured on the H200 on 2026-11-29, are named in the kernels' comments. A kernel that
fails to compile or run is reported with its error and skipped. Writes JSON with the machine and this command to
--out (a directory: small-kernels-h200.json in it; default benchmarks/results/small-kernels-h200.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
import triton

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from graph_timing import graph_us  # noqa: E402 -- benchmarks/h200, the script's own folder
from moemesh.runtime.gpu import fused_ops, norm_rope, paged_attention, pdl  # noqa: E402

LAYERS = 48
HQ, HKV, D, H, E, K, BS = 32, 4, 128, 2048, 128, 8, 16
BF = torch.bfloat16


def _time(fn, pdl_on: bool) -> float:
    """fn(layer) for every layer, in a CUDA graph; microseconds per layer (median replay / LAYERS)."""
    return graph_us(fn, LAYERS, pdl_on, passes=2, warmup=10, rep=50)


def _row(rows: list, kernel: str, variant: str, fn, pdl_on: bool, **extra) -> None:
    try:
        us = _time(fn, pdl_on)
        rows.append({"kernel": kernel, "variant": variant, "us_per_layer": round(us, 2), **extra})
    except Exception as exc:  # noqa: BLE001 -- report and go on with the other variants
        rows.append({"kernel": kernel, "variant": variant, "error": f"{type(exc).__name__}: {exc}"[:300], **extra})
        try:
            torch.cuda.synchronize()
        except Exception:  # noqa: BLE001 -- a broken context: the next variants report their own errors
            pass
    print(rows[-1], flush=True)


def bench_norm_rope(rows: list, pdl_on: bool) -> None:
    qkv = torch.randn(LAYERS, 1, (HQ + 2 * HKV) * D, device="cuda", dtype=BF)  # [L, T=1, 5120]
    qw, kw = (torch.rand(LAYERS, D, device="cuda", dtype=BF) + 0.5 for _ in range(2))
    cos, sin = (torch.randn(1, D, device="cuda", dtype=BF) for _ in range(2))
    pools = torch.zeros(2, LAYERS, 256, HKV, D, device="cuda", dtype=BF)
    slots = torch.tensor([129], device="cuda")

    def fn(i):
        norm_rope.norm_rope_(qkv[i], HQ, HKV, D, qw[i], kw[i], 1e-6, cos, sin, (pools[0, i], pools[1, i], slots))
    _row(rows, "norm_rope", "one program per head", fn, pdl_on)


def bench_attention(rows: list, pdl_on: bool, contexts: list[int]) -> None:
    blocks = triton.cdiv(max(contexts), BS)
    pools = torch.randn(2, LAYERS, blocks * BS, HKV, D, device="cuda", dtype=BF)  # each layer its own K/V
    tables = torch.randperm(blocks, device="cuda", dtype=torch.int32)[None]  # [1, W]
    q = torch.randn(LAYERS, 1, HQ, D, device="cuda", dtype=BF)
    for context in contexts:
        lens = torch.tensor([context], device="cuda", dtype=torch.int32)

        def fn(i, lens=lens):
            paged_attention.paged_decode_attention(q[i], pools[0, i], pools[1, i], tables, lens, D ** -0.5, BS)
        _row(rows, "attention", f"{paged_attention.splits_for(1, HKV)} splits, early table reads", fn, pdl_on,
             context=context)


def bench_routing(rows: list, pdl_on: bool) -> None:
    x, attn = (torch.randn(LAYERS, 1, H, device="cuda", dtype=BF) for _ in range(2))
    nw = torch.rand(H, device="cuda", dtype=BF) + 0.5
    gate = torch.randn(LAYERS, E, H, device="cuda") / 45
    logits = torch.randn(LAYERS, 1, E, device="cuda")
    _row(rows, "routing", "route_softmax", lambda i: fused_ops.route_softmax(logits[i], K, True, 1.0), pdl_on)
    _row(rows, "routing", "router_logits_norm, one expert per program",
         lambda i: fused_ops.router_logits_norm(x[i], attn[i], nw, 1e-6, gate[i]), pdl_on)

    def fn(i):
        fused_ops.route_softmax(fused_ops.router_logits_norm(x[i], attn[i], nw, 1e-6, gate[i])[2], K, True, 1.0)
    _row(rows, "routing", "router_logits_norm + route_softmax", fn, pdl_on)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", default="130,2000", help="attention context lengths (comma-separated)")
    p.add_argument("--no-pdl", action="store_true", help="launch without programmatic dependent launch")
    p.add_argument("--only", default="norm_rope,attention,routing")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results",
                   help="JSON file, or a directory to write small-kernels-h200.json in")
    args = p.parse_args()
    torch.manual_seed(0)
    pdl_on = not args.no_pdl
    rows: list[dict] = []
    only = args.only.split(",")
    if "norm_rope" in only:
        bench_norm_rope(rows, pdl_on)
    if "attention" in only:
        bench_attention(rows, pdl_on, [int(c) for c in args.contexts.split(",")])
    if "routing" in only:
        bench_routing(rows, pdl_on)
    print("\n| kernel | variant | context | us per layer |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['kernel']} | {r['variant']} | {r.get('context', '')} | "
              f"{r.get('us_per_layer', 'failed: ' + r.get('error', ''))} |")
    report = {"machine": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "python": platform.python_version(), "command": "PYTHONPATH=. python3 " + " ".join(sys.argv),
              "pdl": pdl_on and pdl.ON, "layers": LAYERS, "rows": rows}
    out = _out_file(args.out)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")


def _out_file(out: Path) -> Path:
    """--out as given, or small-kernels-h200.json inside it when it is a directory (an existing one, or a path
    without a suffix such as $OUT); its parent created."""
    if out.is_dir() or not out.suffix:
        out = out / "small-kernels-h200.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


if __name__ == "__main__":
    main()
