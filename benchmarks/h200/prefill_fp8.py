"""fp8 experts at prefill sizes, one Qwen3-30B-A3B MoE layer (E 128, top-8, H 2048, I 768), in one run: the new
W8A8 path (gpu/prefill_fp8.py: e4m3 x e4m3 wgmma), today's fp8 path (fused_moe's W8A16 row-block GEMM), bf16 experts
through prefill_moe, and the limits (dense cuBLAS GEMMs of the same FLOPs: bf16, and fp8 through torch._scaled_mm).
Each layer is one CUDA graph replayed (weights rotating over 2 layers); errors against bf16 weights and the W8A16
path. At the first token count: each part alone, and a small sweep of each fp8 GEMM's configs.

    source benchmarks/h200/setup.sh && python3 benchmarks/h200/prefill_fp8.py --out $OUT      # about 2 min
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_kernel import dense_limits, routing  # noqa: E402
from prefill_tma import graph_ms  # noqa: E402

from moemesh.runtime.gpu import prefill_fp8 as pf, prefill_moe as pm, prefill_permute as pp  # noqa: E402
from moemesh.runtime.gpu.fused_moe import fused_moe  # noqa: E402
from moemesh.runtime.quant import quantize  # noqa: E402

PEAK_BF16, PEAK_FP8 = 989.0, 1979.0  # dense TFLOP/s, H200 SXM spec
E, K, H, I = 128, 8, 2048, 768
UP_GRID = [{**pf.DEFAULT_GATE_UP, **d} for d in ({}, {"num_stages": 4}, {"GROUP_M": 16}, {"GROUP_M": 4},
                                                 {"BLOCK_N": 64, "PROMOTE": True})]
DOWN_GRID = [{**pf.DEFAULT_DOWN, **d} for d in ({}, {"GROUP_M": 16}, {"BLOCK_N": 128, "num_stages": 4},
                                                {"BLOCK_N": 128, "PROMOTE": True, "num_stages": 4},
                                                {"PROMOTE": True}, {"BLOCK_K": 64, "num_stages": 4})]
# Both GEMMs summing each K step outside the tensor cores: the accuracy side of PROMOTE (errors table).
PROMOTED = ({**pf.DEFAULT_GATE_UP, "BLOCK_N": 64, "PROMOTE": True},
            {**pf.DEFAULT_DOWN, "BLOCK_N": 128, "BLOCK_K": 64, "PROMOTE": True, "num_stages": 4})


def fp8_dense_tflops(t: int) -> float:
    """The layer's FLOPs as two dense e4m3 GEMMs (torch._scaled_mm, per-tensor scales): the fp8 limit row."""
    rows = t * K

    def one(m: int, n: int, k: int) -> float:
        a = torch.randn(m, k, device="cuda").to(torch.float8_e4m3fn)
        b = torch.randn(n, k, device="cuda").to(torch.float8_e4m3fn)
        one_ = torch.ones((), device="cuda")
        return triton.testing.do_bench(lambda: torch._scaled_mm(a, b.T, one_, one_, out_dtype=torch.bfloat16),
                                       warmup=10, rep=100, return_mode="median")
    ms = one(rows, 2 * I, H) + one(rows, H, I)
    return 2 * rows * 3 * I * H / ms / 1e9


class Case:
    def __init__(self, t: int, bf16_layers, fp8_layers):
        self.t, self.bf16, self.fp8 = t, bf16_layers, fp8_layers
        self.ids, self.weights = routing(t, E, K)
        self.hidden = torch.randn(t, H, device="cuda", dtype=torch.bfloat16)
        self.flops = 2 * t * K * 3 * I * H

    def layer_us(self, who: str, configs=None) -> float:
        if who == "bf16 prefill_moe":
            fns = [lambda gu=gu, dn=dn: pm.prefill_moe(self.hidden, gu, dn, self.ids, self.weights)
                   for gu, dn in self.bf16]
        elif who == "fp8 W8A16 (fused_moe GEMM)":
            fns = [lambda gu=gu, dn=dn: w8a16(self.hidden, gu, dn, self.ids, self.weights) for gu, dn in self.fp8]
        else:
            fns = [lambda gu=gu, dn=dn: pf.prefill_fp8(self.hidden, gu, dn, self.ids, self.weights, configs)
                   for gu, dn in self.fp8]
        return graph_ms(fns) * 1e3

    def errors(self) -> dict[str, float]:
        """Relative errors of the layer output: W8A8 (default configs, and PROMOTED) and W8A16 against bf16
        weights, W8A8 against its torch reference (float32 sums) and the reference against bf16 weights."""
        (gu16, dn16), (gu8, dn8) = self.bf16[0], self.fp8[0]
        exact = pm.prefill_moe(self.hidden, gu16, dn16, self.ids, self.weights)
        ours = pf.prefill_fp8(self.hidden, gu8, dn8, self.ids, self.weights)
        promoted = pf.prefill_fp8(self.hidden, gu8, dn8, self.ids, self.weights, PROMOTED)
        old = w8a16(self.hidden, gu8, dn8, self.ids, self.weights)
        ref = pf.w8a8_reference(self.hidden, gu8, dn8, self.ids, self.weights)
        ref64 = pf.w8a8_reference(self.hidden, gu8, dn8, self.ids, self.weights, act_group=64)

        def rel(a, b):
            return round(((a - b).norm() / b.norm()).item(), 5)
        return {"W8A8_vs_bf16": rel(ours, exact), "W8A16_vs_bf16": rel(old, exact), "W8A8_vs_W8A16": rel(ours, old),
                "W8A8_vs_torch_reference": rel(ours, ref), "torch_reference_vs_bf16": rel(ref, exact),
                "W8A8_promoted_vs_torch_reference": rel(promoted, ref64), "W8A8_promoted_vs_bf16": rel(promoted, exact)}

    def parts_us(self, up: dict, dn: dict) -> dict[str, float]:
        gu, dw = self.fp8[0]
        hq, s_tok = pf.quantize_tokens(self.hidden)
        al, a, inv = pp.permute_fused(hq, self.ids, E, up["BLOCK_M"])
        em = a.shape[0]
        act = torch.empty(em, I, dtype=torch.float8_e4m3fn, device="cuda")
        act_scale = torch.empty(em, I // up["BLOCK_N"], device="cuda")
        pf.launch_gate_up(a, s_tok, gu, act, act_scale, al, K, up)  # real act values for down
        y = torch.empty(em, H, dtype=torch.bfloat16, device="cuda")
        out = torch.empty(self.t, H, device="cuda")
        w = self.weights.reshape(-1).float().contiguous()
        parts = {"quantize_tokens": lambda: pf.quantize_tokens(self.hidden),
                 "permute_fused_fp8": lambda: pp.permute_fused(hq, self.ids, E, up["BLOCK_M"]),
                 "gate_up": lambda: pf.launch_gate_up(a, s_tok, gu, act, act_scale, al, K, up),
                 "down": lambda: pf.launch_down(act, act_scale, dw, y, w, al, dn, up["BLOCK_N"]),
                 "gather_sum": lambda: pp.gather_sum(y, inv, self.ids, out)}
        return {name: round(graph_ms([fn]) * 1e3, 1) for name, fn in parts.items()}


def w8a16(hidden, gu, dn, ids, weights):
    """Today's fp8 prefill: fused_moe with prefill_fp8 off."""
    pf.ENABLED = False
    try:
        return fused_moe(hidden, gu, dn, ids, weights)
    finally:
        pf.ENABLED = True


def sweep(case: Case, deadline: float) -> tuple[dict, dict, list[dict]]:
    """Each fp8 GEMM's configs (all BLOCK_M 128), timed alone beside the other's default; the fastest of each."""
    rows, best = [], {}
    for kind, grid in (("gate_up", UP_GRID), ("down", DOWN_GRID)):
        for cfg in grid:
            up, dn = (cfg, pf.DEFAULT_DOWN) if kind == "gate_up" else (pf.DEFAULT_GATE_UP, cfg)
            if up["BLOCK_N"] % dn["BLOCK_K"]:  # act's scale groups are gate_up's BLOCK_N
                up, dn = (up, {**dn, "BLOCK_K": up["BLOCK_N"]}) if kind == "gate_up" else ({**up, "BLOCK_N": 64}, dn)
            if time.perf_counter() > deadline or pf.usable(case.hidden, *case.fp8[0], up, dn):
                continue
            try:
                us = case.parts_us(up, dn)[kind]
            except Exception as exc:  # noqa: BLE001 -- out of shared memory / registers: skip it
                print(f"  skip {kind} {cfg}: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
                continue
            rows.append({"kind": kind, "config": cfg, "us": us})
            print(f"  {kind:7s} {us:7.1f} us {cfg}", flush=True)
            if kind not in best or us < best[kind][1]:
                best[kind] = (cfg, us)
    return best.get("gate_up", (pf.DEFAULT_GATE_UP,))[0], best.get("down", (pf.DEFAULT_DOWN,))[0], rows


def row(case: Case, who: str, us: float, err: float | None = None, configs=None) -> dict:
    tf = case.flops / us / 1e6
    r = {"tokens": case.t, "who": who, "us": round(us, 1), "TFLOP_per_s": round(tf, 1),
         "pct_of_bf16_peak": round(100 * tf / PEAK_BF16, 1), "pct_of_fp8_peak": round(100 * tf / PEAK_FP8, 1),
         "rel_err_vs_bf16_weights": err, "configs": configs}
    print(f"  T={case.t} {who}: {us:.1f} us, {tf:.1f} TFLOP/s ({r['pct_of_bf16_peak']}% of bf16 peak), "
          f"err {err}", flush=True)
    return r


def limit_row(case: Case, who: str, tflops: float) -> dict:
    return row(case, who, case.flops / tflops / 1e6)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=lambda s: [int(x) for x in s.split(",")], default=[4096, 1024, 16384],
                   help="the first one gets the parts and the sweep")
    p.add_argument("--budget", type=float, default=60.0, help="seconds for the sweep")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args(argv)
    torch.manual_seed(0)
    bf16 = [(torch.randn(E, 2 * I, H, device="cuda", dtype=torch.bfloat16) * 0.02,
             torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16) * 0.02) for _ in range(2)]
    fp8 = [(quantize(gu.float(), "fp8"), quantize(dn.float(), "fp8")) for gu, dn in bf16]
    rows, meta = [], {"machine": torch.cuda.get_device_name(), "host": platform.node(), "torch": torch.__version__,
                      "triton": triton.__version__, "command": "python3 benchmarks/h200/prefill_fp8.py "
                      + " ".join(argv if argv is not None else sys.argv[1:])}
    parts, sweep_rows, best = {}, [], None
    for n, t in enumerate(args.tokens):
        case = Case(t, bf16, fp8)
        print(f"T={t}", flush=True)
        if n == 0:
            up, dn, sweep_rows = sweep(case, time.perf_counter() + args.budget)
            best = (up, dn)
            parts = {"default": case.parts_us(pf.DEFAULT_GATE_UP, pf.DEFAULT_DOWN), "best": case.parts_us(up, dn)}
            print(f"  parts: {parts}", flush=True)
        errs = case.errors()
        meta.setdefault("errors", {})[t] = errs
        rows.append(row(case, "bf16 experts: prefill_moe", case.layer_us("bf16 prefill_moe"), 0.0))
        rows.append(row(case, "fp8 experts: W8A16 (fused_moe GEMM, before)",
                        case.layer_us("fp8 W8A16 (fused_moe GEMM)"), errs["W8A16_vs_bf16"]))
        rows.append(row(case, "fp8 experts: W8A8 prefill_fp8 (default)", case.layer_us("w8a8"),
                        errs["W8A8_vs_bf16"], [pf.DEFAULT_GATE_UP, pf.DEFAULT_DOWN]))
        if best and best != (pf.DEFAULT_GATE_UP, pf.DEFAULT_DOWN) and not pf.usable(case.hidden, *fp8[0], *best):
            rows.append(row(case, "fp8 experts: W8A8 prefill_fp8 (swept best)", case.layer_us("w8a8", best),
                            None, list(best)))
        rows.append(row(case, "fp8 experts: W8A8 prefill_fp8 (PROMOTED)", case.layer_us("w8a8", PROMOTED),
                        errs["W8A8_promoted_vs_bf16"], list(PROMOTED)))
        limits = dense_limits(t, K, H, I)
        rows.append(limit_row(case, "limit: the FLOPs as 2 dense bf16 cuBLAS GEMMs", limits["dense_same_flops"]))
        rows.append(limit_row(case, "limit: the FLOPs as 2 dense e4m3 GEMMs (torch._scaled_mm)",
                              fp8_dense_tflops(t)))
        del case
    write(args.out, meta, rows, parts, sweep_rows)
    return 0


def write(out: Path, meta: dict, rows: list[dict], parts: dict, sweep_rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "prefill-fp8-h200.json").write_text(json.dumps({**meta, "parts_us": parts, "rows": rows,
                                                           "sweep": sweep_rows}, indent=1) + "\n")
    lines = [f"# MoE layer prefill with fp8 experts (E {E}, top-{K}, H {H}, I {I}): W8A8 vs W8A16 vs bf16", "",
             f"{meta['machine']}; `{meta['command']}`; torch {meta['torch']}, triton {meta['triton']}", "",
             f"Relative error of the layer output by token count: {meta['errors']}", "",
             f"Parts alone at {rows[0]['tokens']} tokens, us: {parts}", "",
             "| tokens | who | us | TFLOP/s | % of 989 (bf16 peak) | % of 1979 (fp8 peak) | rel err vs bf16 weights |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['tokens']} | {r['who']} | {r['us']} | {r['TFLOP_per_s']} | {r['pct_of_bf16_peak']} | "
              f"{r['pct_of_fp8_peak']} | {'-' if r['rel_err_vs_bf16_weights'] is None else r['rel_err_vs_bf16_weights']}"
              " |" for r in rows]
    lines += ["", "Sweep (each GEMM alone, us):", ""] + [f"- {r['kind']} {r['us']} {r['config']}" for r in sweep_rows]
    (out / "prefill-fp8-h200.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    sys.exit(main())
