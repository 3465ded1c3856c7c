"""The prefill MoE path (gpu/prefill_moe.py: permuted rows, TMA + wgmma, persistent grids) beside fused_moe and
torch._grouped_mm in one run, at 4,096 tokens (and 1,024, 16,384) of the Qwen3-30B-A3B layer (E 128, top-8,
H 2048, I 768, bf16). At 4,096 tokens: a sweep of block configs per kernel (each kernel timed alone, replayed in a
CUDA graph), the best pair with a shared BLOCK_M, then the whole layer (align + permute + 2 GEMMs + combine, graph
replay) for both combines (gather-sum kernel vs float32 atomics), its error against fused_moe, and a breakdown.
Beside the defaults, the variants of prefill_tma_configs.py (EPI_SPLIT, PDL) as whole layers and in the sweep, and
each part alone. The other token counts run the best config of each BLOCK_M, the defaults and the fastest variant.
Every config runs in try/except; past --budget seconds the sweep stops. Weights rotate over 2 layers (one layer's
1.2 GB is far beyond L2 anyway).

    source benchmarks/h200/setup.sh && python3 benchmarks/h200/prefill_tma.py --out $OUT     # about 4 min
    ... --no-sweep: the default configs only
"""

from __future__ import annotations

import argparse
import itertools
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
from prefill_tma_configs import DOWN_GRID, GATE_UP_GRID, SPLIT_DOWN, VARIANTS  # noqa: E402

from moemesh.runtime.experts import GROUPED_MM  # noqa: E402
from moemesh.runtime.gpu import prefill_moe as pm, prefill_permute as pp  # noqa: E402
from moemesh.runtime.gpu.fused_moe import fused_moe  # noqa: E402

PEAK = 989.0  # bf16 dense TFLOP/s, H200 SXM spec
E, K, H, I = 128, 8, 2048, 768
DEV, DT = "cuda", torch.bfloat16  # a smoke run on the CPU (Triton's interpreter) swaps these for cpu, float16


def graph_ms(fns) -> float:
    """Median ms of one call, each fn (one per layer of weights) captured in a CUDA graph, replays rotating."""
    for fn in fns:
        fn()  # compile and warm outside the capture
    graphs = []
    for fn in fns:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        graphs.append(g)
    it = itertools.cycle(graphs)
    return triton.testing.do_bench(lambda: next(it).replay(), warmup=10, rep=60, return_mode="median")


class Case:
    """One token count: routing, hidden, and per BLOCK_M the alignment, permuted rows and output buffers."""

    def __init__(self, t: int, layers):
        self.t, self.layers = t, layers
        self.ids, self.weights = routing(t, E, K, DEV)
        self.hidden = torch.randn(t, H, device=DEV, dtype=DT)
        self.flat_weights = self.weights.reshape(-1).float().contiguous()
        self.flops = 2 * t * K * 3 * I * H
        self._by_bm = {}

    def rows(self, bm: int):
        if bm not in self._by_bm:
            al, a, inv = pp.permute(self.hidden, self.ids, E, bm)
            em = a.shape[0]
            act = torch.randn(em, I, device=DEV, dtype=DT)
            y = torch.empty(em, H, device=DEV, dtype=DT)
            self._by_bm[bm] = (al, a, inv, act, y)
        return self._by_bm[bm]

    def gate_up_ms(self, cfg: dict) -> float:
        al, a, _, act, _ = self.rows(cfg["BLOCK_M"])
        return graph_ms([lambda gu=gu: pm.launch_gate_up(a, gu, act, al, cfg) for gu, _ in self.layers])

    def down_ms(self, cfg: dict, combine: str, gemm: bool = True) -> float:
        """The down GEMM plus its combine: the gather-sum kernel, or zeroing the atomics' float32 output.
        combine "none": the GEMM alone (y rows); gemm=False: the combine alone."""
        al, _, inv, act, y = self.rows(cfg["BLOCK_M"])
        out = torch.empty(self.t, H, device=DEV)

        def run(dn):
            if combine == "atomic":
                out.zero_()
            if gemm:
                pm.launch_down(act, dn, y, out, self.flat_weights, al, K, cfg, atomic=combine == "atomic")
            if combine == "gather":
                pp.gather_sum(y, inv, self.ids, out)
        return graph_ms([lambda dn=dn: run(dn) for _, dn in self.layers])

    def layer_ms(self, who: str, configs=None, combine: str = "gather", fused_permute: bool = True) -> float:
        if who == "fused_moe":
            return graph_ms([lambda gu=gu, dn=dn: fused_moe(self.hidden, gu, dn, self.ids, self.weights)
                             for gu, dn in self.layers])
        if who == "prefill_moe":
            return graph_ms([lambda gu=gu, dn=dn: pm.prefill_moe(self.hidden, gu, dn, self.ids, self.weights,
                                                                 configs, combine, fused_permute)
                             for gu, dn in self.layers])
        return self.grouped_ms()

    def grouped_ms(self) -> float:
        """torch._grouped_mm on rows sorted beforehand (moe_kernel.py's baseline: the sort is not timed)."""
        flat = self.ids.reshape(-1)
        offs = torch.cumsum(torch.bincount(flat, minlength=E), 0, dtype=torch.int32)
        x = self.hidden[flat.argsort(stable=True) // K]
        it = itertools.cycle(self.layers)

        def run():
            gu, dn = next(it)
            g, u = GROUPED_MM(x, gu.transpose(1, 2), offs=offs).chunk(2, dim=-1)
            return GROUPED_MM((torch.nn.functional.silu(g) * u).contiguous(), dn.transpose(1, 2), offs=offs)
        return triton.testing.do_bench(run, warmup=10, rep=60, return_mode="median")

    def rel_error(self, configs, combine: str, fused_permute: bool) -> float:
        gu, dn = self.layers[0]
        want = fused_moe(self.hidden, gu, dn, self.ids, self.weights)
        got = pm.prefill_moe(self.hidden, gu, dn, self.ids, self.weights, configs, combine, fused_permute)
        return ((got - want).norm() / want.norm()).item()


def tflops(flops: float, ms: float) -> float:
    return flops / ms / 1e9


def sweep(case: Case, deadline: float) -> list[dict]:
    """Each gate_up config, each down config x combine, timed alone (TFLOP/s of that kernel's own FLOPs)."""
    results = []
    lists = [[("gate_up", cfg, "") for cfg in GATE_UP_GRID]]
    lists += [[("down", cfg, combine) for cfg in DOWN_GRID if not (combine == "atomic" and cfg.get("EPI_SPLIT"))]
              for combine in ("gather", "atomic")]  # EPI_SPLIT changes only the gather combine's y store
    # round robin over the three lists (each starts with its default), so a cut-short sweep still covers each kind
    jobs = [job for group in itertools.zip_longest(*lists) for job in group if job]
    for kind, cfg, combine in jobs:
        if time.perf_counter() > deadline:
            print(f"  budget spent: skipping {kind} {combine} {cfg}", flush=True)
            continue
        flops = case.flops * (2 / 3 if kind == "gate_up" else 1 / 3)
        gu, dn = case.layers[0]
        why = pm.usable(case.hidden, gu, dn, cfg, {**cfg, "BLOCK_N": 64, "BLOCK_K": 64}) if kind == "gate_up" else \
            pm.usable(case.hidden, gu, dn, {**cfg, "BLOCK_N": 64, "BLOCK_K": 64}, cfg)
        if why:
            print(f"  skip {kind} {combine} {cfg}: {why}", flush=True)
            continue
        try:
            ms = case.gate_up_ms(cfg) if kind == "gate_up" else case.down_ms(cfg, combine)
        except Exception as exc:  # noqa: BLE001 -- out of shared memory / registers, a Triton version gap: skip it
            print(f"  skip {kind} {combine} {cfg}: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
            continue
        results.append({"kind": kind, "combine": combine, "config": cfg, "us": round(ms * 1e3, 1),
                        "TFLOP_per_s": round(tflops(flops, ms), 1)})
        print(f"  {kind:7s} {combine:6s} {ms * 1e3:7.1f} us {tflops(flops, ms):6.1f} TFLOP/s {cfg}", flush=True)
    return results


def best_pairs(results: list[dict]) -> dict[tuple[int, str], tuple[dict, dict, float]]:
    """Per (BLOCK_M, combine): the fastest gate_up and down configs and their summed us."""
    best = {}
    for bm, combine in itertools.product({r["config"]["BLOCK_M"] for r in results}, ("gather", "atomic")):
        ups = [r for r in results if r["kind"] == "gate_up" and r["config"]["BLOCK_M"] == bm]
        downs = [r for r in results if r["kind"] == "down" and r["combine"] == combine
                 and r["config"]["BLOCK_M"] == bm]
        if ups and downs:
            up, dn = min(ups, key=lambda r: r["us"]), min(downs, key=lambda r: r["us"])
            best[(bm, combine)] = (up["config"], dn["config"], up["us"] + dn["us"])
    return best


def layer_rows(case: Case, pairs: dict, deadline: float, variants=()) -> list[dict]:
    """The whole layer: fused_moe, torch._grouped_mm, prefill_moe per (BLOCK_M, combine) pair given (fused
    permute), the fastest pair again with moe_align's alignment + the copy kernel, and variants [(name, gate_up
    config, down config)] with the gather combine."""
    rows = []
    jobs = [("fused_moe", None, "", None, ""), ("torch._grouped_mm", None, "", None, "")]
    jobs += [("prefill_moe", (up, dn), "gather", True, name) for name, up, dn in variants]
    jobs += [("prefill_moe", (up, dn), combine, True, "best") for (_, combine), (up, dn, _) in sorted(pairs.items())]
    (_, combine), (up, dn, _) = min(pairs.items(), key=lambda kv: kv[1][2])
    jobs.append(("prefill_moe", (up, dn), combine, False, "best"))
    for who, configs, combine, fused_permute, name in jobs:
        if who == "prefill_moe" and time.perf_counter() > deadline:
            print(f"  budget spent: skipping T={case.t} {combine} {configs}", flush=True)
            continue
        try:
            ms = case.layer_ms(who, configs, combine or "gather", fused_permute)
            err = case.rel_error(configs, combine, fused_permute) if who == "prefill_moe" else 0.0
        except Exception as exc:  # noqa: BLE001
            print(f"  skip T={case.t} {who} {combine} {name}: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
            continue
        bm = configs[0]["BLOCK_M"] if configs else None
        permute = "" if fused_permute is None else "fused" if fused_permute else "moe_align"
        rows.append({"tokens": case.t, "who": who, "variant": name, "combine": combine, "permute": permute,
                     "BLOCK_M": bm, "us": round(ms * 1e3, 1), "TFLOP_per_s": round(tflops(case.flops, ms), 1),
                     "pct_of_989": round(100 * tflops(case.flops, ms) / PEAK, 1), "rel_err_vs_fused_moe": err,
                     "configs": configs})
        print(f"  T={case.t} {who} {name} {combine} {permute} BM={bm}: {ms * 1e3:.1f} us, "
              f"{rows[-1]['TFLOP_per_s']} TFLOP/s ({rows[-1]['pct_of_989']}%), rel err {err:.2e}", flush=True)
    return rows


def breakdown(case: Case, up: dict) -> dict[str, float]:
    """us of each part alone (graph replay): the row movement at the best gate_up's BLOCK_M, and at BLOCK_M 128
    the default GEMMs without their combine (and EPI_SPLIT's down GEMM), and the gather-sum alone."""
    from moemesh.runtime.gpu.moe_align import align

    bm = up["BLOCK_M"]
    parts = {"align_us": lambda: align(case.ids, E, bm),
             "align_plus_copy_us": lambda: pp.permute(case.hidden, case.ids, E, bm),
             "permute_fused_us": lambda: pp.permute_fused(case.hidden, case.ids, E, bm)}
    got = {name: round(graph_ms([fn]) * 1e3, 1) for name, fn in parts.items()}
    gemms = {"gate_up_default_us": lambda: case.gate_up_ms(pm.DEFAULT_GATE_UP),
             "down_default_gemm_only_us": lambda: case.down_ms(pm.DEFAULT_DOWN, "none"),
             "down_EPI_SPLIT_gemm_only_us": lambda: case.down_ms(SPLIT_DOWN[0], "none"),
             "gather_sum_only_us": lambda: case.down_ms(pm.DEFAULT_DOWN, "gather", gemm=False)}
    for name, fn in gemms.items():
        try:
            got[name] = round(fn() * 1e3, 1)
        except Exception as exc:  # noqa: BLE001
            got[name] = f"{type(exc).__name__}: {str(exc)[:80]}"
    return got


def write(out: Path, meta: dict, sweep_rows: list[dict], rows: list[dict], parts: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "prefill-tma-h200.json").write_text(json.dumps({**meta, "breakdown": parts, "layer": rows,
                                                           "sweep": sweep_rows}, indent=1) + "\n")
    swept = meta["swept_tokens"]
    lines = [f"# MoE layer prefill (E {E}, top-{K}, H {H}, I {I}, bf16): prefill_moe (TMA, persistent) vs "
             "fused_moe vs torch._grouped_mm", "", f"{meta['machine']}; `{meta['command']}`; torch {meta['torch']}, "
             f"triton {meta['triton']}", "", f"{swept} tokens, alone: {parts}; cuBLAS bf16 TFLOP/s: "
             f"{meta['cublas_TFLOP_per_s']}", "",
             "| tokens | who | variant | combine | permute | BLOCK_M | us | TFLOP/s | % of 989 | rel err vs fused_moe"
             " |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['tokens']} | {r['who']} | {r['variant']} | {r['combine']} | {r['permute']} | {r['BLOCK_M']} | "
              f"{r['us']} | {r['TFLOP_per_s']} | {r['pct_of_989']} | {r['rel_err_vs_fused_moe']:.1e} |" for r in rows]
    lines += ["", f"Sweep at {swept} tokens, each kernel alone:", "", "| kernel | combine | us | TFLOP/s | config |",
              "|---|---|---|---|---|"]
    lines += [f"| {r['kind']} | {r['combine']} | {r['us']} | {r['TFLOP_per_s']} | {r['config']} |"
              for r in sweep_rows]
    (out / "prefill-tma-h200.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=lambda s: [int(x) for x in s.split(",")], default=[4096, 1024, 16384],
                   help="the first one is swept")
    p.add_argument("--budget", type=float, default=230.0,
                   help="seconds: the sweep stops at budget - 80, the whole-layer rows of prefill_moe at budget")
    p.add_argument("--no-sweep", action="store_true", help="only the default configs (about 1 min)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args(argv)
    started = time.perf_counter()
    deadline = started + args.budget
    torch.manual_seed(0)
    layers = [(torch.randn(E, 2 * I, H, device=DEV, dtype=DT) * 0.02, torch.randn(E, H, I, device=DEV, dtype=DT) * 0.02)
              for _ in range(2)]
    print(f"sweep at T={args.tokens[0]}", flush=True)
    case = Case(args.tokens[0], layers)
    sweep_rows = [] if args.no_sweep else sweep(case, deadline - 80)  # leave time for the whole-layer rows
    defaults = {(128, c): (pm.DEFAULT_GATE_UP, pm.DEFAULT_DOWN, 0.0) for c in ("gather", "atomic")}
    pairs = best_pairs(sweep_rows) or defaults
    rows = layer_rows(case, pairs, deadline - 45, VARIANTS)
    named = {name: (name, up, dn) for name, up, dn in VARIANTS}
    fastest = min((r for r in rows if r["variant"] in named), key=lambda r: r["us"], default=None)
    again = [named["default"]] + ([named[fastest["variant"]]] if fastest and fastest["variant"] != "default" else [])
    best_up = min(pairs.values(), key=lambda v: v[2])[0]
    try:
        parts = breakdown(case, best_up)
    except Exception as exc:  # noqa: BLE001
        parts = {"error": f"{type(exc).__name__}: {str(exc)[:160]}"}
    for t in args.tokens[1:]:
        del case
        if DEV == "cuda":
            torch.cuda.empty_cache()
        case = Case(t, layers)
        rows += layer_rows(case, pairs, deadline, again)  # the defaults and the fastest variant too
    write(args.out, machine_meta(args.tokens[0], pairs, started), sweep_rows, rows, parts)
    return 0


def machine_meta(swept: int, pairs: dict, started: float) -> dict:
    """Machine, versions, command, the best config pairs and the cuBLAS limits (moe_kernel.py's dense_limits)."""
    machine = torch.cuda.get_device_name() if DEV == "cuda" else "cpu (Triton interpreter smoke run)"
    meta = {"machine": machine, "host": platform.platform(), "torch": torch.__version__, "triton": triton.__version__,
            "bf16_spec_TFLOP_per_s": PEAK, "swept_tokens": swept, "command": "python3 " + " ".join(sys.argv),
            "seconds": round(time.perf_counter() - started, 1),
            "best_pairs": [{"BLOCK_M": bm, "combine": c, "gate_up": up, "down": dn, "us_alone": round(us, 1)}
                           for (bm, c), (up, dn, us) in sorted(pairs.items())]}
    try:  # the swept layer's FLOPs as two dense cuBLAS GEMMs, and 8192^3
        meta["cublas_TFLOP_per_s"] = dense_limits(swept, K, H, I) if DEV == "cuda" else {}
    except Exception as exc:  # noqa: BLE001
        meta["cublas_TFLOP_per_s"] = {"error": f"{type(exc).__name__}: {str(exc)[:160]}"}
    return meta


if __name__ == "__main__":
    raise SystemExit(main())
