"""One int4 MoE layer at prefill sizes (E 128, top-8, H 2048, I 768: Qwen3-30B-A3B), side by side in one run:
the int4 row-block GEMM (fused_moe before gpu/int4_prefill.py), the experts dequantized + prefill_moe, the codes as
e4m3 + prefill_fp8 (W8A8, symmetric int4 from 1,024 tokens), bf16 experts through prefill_moe, and each conversion
alone.

    PYTHONPATH=. python3 benchmarks/h200/int4_prefill.py [--tokens 1024,2048,4096,8192] [--out DIR]

Prints a table (us per layer, TFLOP/s of the layer's useful FLOPs) and writes DIR/int4-prefill-h200.json with the
machine and command (int4-prefill-h200-fp8.json). The int4 rows are forced at every size, so the crossovers show.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
import triton

E, K, H, I = 128, 8, 2048, 768


def layer(t: int):
    """Inputs of one layer at t tokens: hidden [t, H] and routing (ids, weights [t, K])."""
    gen = torch.Generator(device="cuda").manual_seed(t)
    hidden = torch.randn(t, H, device="cuda", dtype=torch.bfloat16, generator=gen)
    w, ids = torch.randn(t, E, device="cuda", generator=gen).softmax(-1).topk(K, -1)
    return hidden, ids, w


def rows(tokens: list[int]) -> list[dict]:
    from moemesh.runtime.gpu import int4_prefill as ip
    from moemesh.runtime.gpu import prefill_moe
    from moemesh.runtime.gpu.fused_moe import fused_moe
    from moemesh.runtime.quant import quantize

    gu = quantize(torch.randn(E, 2 * I, H, device="cuda") / 45, "int4")
    dn = quantize(torch.randn(E, H, I, device="cuda") / 28, "int4")
    gu16, dn16 = gu.dequantize(torch.bfloat16), dn.dequantize(torch.bfloat16)
    out = []
    for t in tokens:
        hidden, ids, w = layer(t)
        flops = 2 * t * K * 3 * H * I
        cases = {"int4 row-block GEMM (before)": lambda: _gemm_path(fused_moe, ip, hidden, gu, dn, ids, w),
                 "int4 dequantized + prefill_moe": lambda: ip.int4_prefill(hidden, gu, dn, ids, w, fp8=False),
                 "int4 as e4m3 codes + prefill_fp8 (W8A8)": lambda: ip.int4_prefill(hidden, gu, dn, ids, w,
                                                                                    fp8=True),
                 "bf16 prefill_moe": lambda: prefill_moe.prefill_moe(hidden, gu16, dn16, ids, w)}
        a, b = ip.int4_prefill(hidden, gu, dn, ids, w, fp8=True), ip.int4_prefill(hidden, gu, dn, ids, w, fp8=False)
        out.append({"tokens": t, "who": "rel error, e4m3 route vs bf16 route",
                    "value": round(((a - b).norm() / b.norm()).item(), 5)})
        for who, fn in cases.items():
            us = triton.testing.do_bench(fn, warmup=3, rep=30, return_mode="median") * 1e3
            out.append({"tokens": t, "who": who, "us": round(us, 1), "tflop_s": round(flops / us / 1e6, 1)})
            print(json.dumps(out[-1]), flush=True)
    bufs = ip._scratch(E, tuple(gu.shape[1:]), tuple(dn.shape[1:]), torch.bfloat16, torch.device("cuda"))
    us = triton.testing.do_bench(lambda: (ip.dequantize_into(gu, bufs[0]), ip.dequantize_into(dn, bufs[1])),
                                 warmup=3, rep=30, return_mode="median") * 1e3
    moved = gu.q.numel() + dn.q.numel() + gu.scale.numel() * 4 + dn.scale.numel() * 4 + bufs[0].numel() * 2 \
        + bufs[1].numel() * 2
    out.append({"tokens": None, "who": "dequantize 128 experts alone", "us": round(us, 1),
                "GB_s": round(moved / us / 1e3)})
    print(json.dumps(out[-1]), flush=True)
    codes = ip._scratch(E, tuple(gu.shape[1:]), tuple(dn.shape[1:]), torch.float8_e4m3fn, torch.device("cuda"))
    us = triton.testing.do_bench(lambda: (ip.as_fp8(gu, codes[0]), ip.as_fp8(dn, codes[1])), warmup=3, rep=30,
                                 return_mode="median") * 1e3
    out.append({"tokens": None, "who": "int4 -> e4m3 codes, 128 experts alone", "us": round(us, 1)})
    print(json.dumps(out[-1]), flush=True)
    return out


def _gemm_path(fused_moe, ip, hidden, gu, dn, ids, w):
    """fused_moe as before int4_prefill: its int4 row-block GEMM at every size."""
    saved, ip.MIN_TOKENS, fp8, ip.FP8 = ip.MIN_TOKENS, 1 << 30, ip.FP8, False
    try:
        return fused_moe(hidden, gu, dn, ids, w)
    finally:
        ip.MIN_TOKENS, ip.FP8 = saved, fp8


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=lambda s: [int(x) for x in s.split(",")], default=[1024, 2048, 4096, 8192])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args()
    table = rows(args.tokens)
    meta = {"machine": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "command": "python3 " + " ".join(sys.argv)}
    lines = ["# One int4 MoE layer at prefill sizes (Qwen3-30B-A3B experts), us", "",
             f"{meta['machine']}; `{meta['command']}`; torch {meta['torch']}, triton {meta['triton']}", "",
             "| tokens | who | us (or value) | TFLOP/s |", "|---|---|---|---|"]
    lines += [f"| {r['tokens']} | {r['who']} | {r.get('us', r.get('value'))} | {r.get('tflop_s', '')} |"
              for r in table]
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "int4-prefill-h200-fp8.md").write_text("\n".join(lines) + "\n")
    (args.out / "int4-prefill-h200-fp8.json").write_text(json.dumps({**meta, "rows": table}, indent=1) + "\n")


if __name__ == "__main__":
    main()
