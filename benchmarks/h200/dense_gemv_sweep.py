"""Configs of the dense decode GEMV (gpu/dense_gemv.py) at 1 and 2 rows on Qwen3-30B-A3B's attention projections:
q/k/v with the input norm folded (N 5120, K 2048; x bfloat16, delta the routed experts' float32 output, as
Backbone._fast_steps gives them), q/k/v without it (MOEMESH_NORM_FOLD=0) and o (N 2048, K 4096). Every candidate
runs over 12 layers' weights (more than the 50 MB L2) captured in a CUDA graph, timed by triton.testing.do_bench;
a candidate that fails to compile or computes a wrong result is skipped. Prints the fastest per kind and rows with
weight GB/s, beside the engine's pick (the table, else the default), the default, the kernel autotuned at first
call as before the table (its old candidates, one program per row) and cuBLAS (F.linear; with the norm kernel
before it for the folded kind), then the table JSON; --write merges it into
moemesh/runtime/gpu/configs/dense_gemv,dtype=bfloat16,device=<GPU>.json. Results: benchmarks/results/.

    PYTHONPATH=. python3 benchmarks/h200/dense_gemv_sweep.py [--write] [--pdl] [--kinds qkv_norm,qkv,o]
    TRITON_INTERPRET=1 python3 benchmarks/h200/dense_gemv_sweep.py --smoke --out /tmp/x.json  # CPU: code paths only

--pdl: launched with PDL as the engine does at batch 1 (consecutive GEMVs then overlap: optimistic); default off,
each kernel alone as benchmarks/h200/gemv_sweep.py times the expert GEMVs. Rows 2: the fastest --top of rows 1.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from graph_timing import graph_us
from moemesh.runtime.gpu import dense_gemv, fused_ops, pdl

KINDS = {"qkv_norm": (5120, 2048, True), "qkv": (5120, 2048, False), "o": (2048, 4096, False)}  # (N, K, norm)
LAYERS = 12  # 252 MB of q/k/v weights, 201 MB of o: each layer's read from HBM, as in a decode step
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: Triton's interpreter, --smoke (figures meaningless)
COPY_GBS = 4220  # device copy bandwidth measured on the H200 (../shared/FACTS.md)
# The candidates triton.autotune chose from at first call before the table: (BLOCK_N, BLOCK_K, warps, stages)
OLD = ((1, 2048, 4, 1), (1, 4096, 4, 1), (2, 2048, 2, 1), (2, 2048, 4, 1), (4, 2048, 4, 1), (4, 2048, 8, 1),
       (8, 1024, 4, 2), (2, 4096, 8, 1), (4, 1024, 4, 2), (8, 2048, 8, 1), (16, 512, 4, 3))
OLD_NORM = OLD + ((16, 2048, 8, 1), (16, 1024, 8, 2), (32, 1024, 8, 2))
RESULTS = Path(__file__).resolve().parents[1] / "results"


def candidates(k: int) -> list[dict]:
    """BLOCK_N 1-32 x whole-K or half-K tiles x 2-8 warps, <= 128 weights per thread (more spill on sm_90: ptxas
    of 16 x 2048 at 4 warps); half-K tiles (a 2-step loop) also with the pipeliner's prefetch (2 stages)."""
    whole = triton.next_power_of_2(k)
    out = []
    for bk, bn, warps in itertools.product((whole, whole // 2), (1, 2, 4, 8, 16, 32), (2, 4, 8)):
        if bn * bk <= 128 * 32 * warps:
            out += [{"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps, "num_stages": s}
                    for s in ((1,) if bk == whole else (1, 2))]
    return out


class Case:
    """One kind at T rows: LAYERS weights [N, K] bf16, the row inputs, and the float32 reference of layer 0."""

    def __init__(self, kind: str, rows: int):
        self.kind, self.rows = kind, rows
        self.n, self.k, self.norm = KINDS[kind]
        self.w = [torch.randn(self.n, self.k, device=DEV, dtype=torch.bfloat16) / self.k ** 0.5
                  for _ in range(LAYERS)]
        self.x = torch.randn(rows, self.k, device=DEV, dtype=torch.bfloat16)
        self.d = torch.randn(rows, self.k, device=DEV) if self.norm else None  # [T, K] float32
        self.nw = torch.rand(self.k, device=DEV, dtype=torch.bfloat16) + 0.5
        h = fused_ops.add_rms_norm(self.x, self.d, self.nw, 1e-6)[1] if self.norm else self.x
        self.ref = F.linear(h.float(), self.w[0].float())

    def gemv(self, cfg: dict | None):
        """step(i): the engine's call on layer i (cfg None: its own pick)."""
        if self.norm:
            return lambda i: dense_gemv.norm_linear(self.x, self.d, self.nw, 1e-6, self.w[i], None, cfg)[1]
        return lambda i: dense_gemv.linear(self.x, self.w[i], None, cfg)

    def cublas(self):
        if self.norm:  # the unfused norm kernel, then cuBLAS
            return lambda i: F.linear(fused_ops.add_rms_norm(self.x, self.d, self.nw, 1e-6)[1], self.w[i])
        return lambda i: F.linear(self.x, self.w[i])

    def pair(self):
        """The folded kind unfolded: the norm kernel, then the GEMV with the engine's pick (MOEMESH_NORM_FOLD=0)."""
        return lambda i: dense_gemv.linear(fused_ops.add_rms_norm(self.x, self.d, self.nw, 1e-6)[1], self.w[i])

    def autotuned(self):
        """The GEMV as before the table: triton.autotune over OLD(_NORM) at the first call, one program per row."""
        configs = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
                   for bn, bk, w, s in (OLD_NORM if self.norm else OLD)]
        tuner = triton.autotune(configs=configs, key=["n", "k"])(dense_gemv._gemv_norm if self.norm
                                                                 else dense_gemv._gemv)
        x, t, n, k = self.x, self.rows, self.n, self.k

        def step(i):
            y = torch.empty(t, n, device=DEV, dtype=torch.bfloat16)
            xo = torch.empty_like(x) if self.norm else x
            tuner[lambda meta: (t, triton.cdiv(n, meta["BLOCK_N"]))](
                x, self.d if self.norm else x, self.nw, xo, self.w[i], x, y, n, k, 1e-6, HAS_BIAS=False,
                ADD=self.norm, ROWS=1, NORM_BLOCK=triton.next_power_of_2(k), **pdl.launch())
            return y
        step(0)  # tunes now (its own timing, outside the graph), as the engine's first call did
        return step, tuner.best_config

    def check(self, step) -> None:
        y = step(0).float()
        err = ((y - self.ref).norm() / self.ref.norm()).item()
        if not err < 1e-2:
            raise ValueError(f"wrong result: relative error {err:.3g}")


def bench(step, use_pdl: bool) -> float:
    """Microseconds per layer of step(0..LAYERS-1) replayed from one CUDA graph (no launch gaps)."""
    if DEV == "cpu":  # the interpreter: one pass, wall time
        started = time.perf_counter()
        for i in range(LAYERS):
            step(i)
        return (time.perf_counter() - started) * 1e6 / LAYERS
    return graph_us(step, LAYERS, use_pdl)


def _registers(norm: bool) -> tuple[int | None, int | None]:
    """(registers, spilled bytes) of the _gemv(_norm) variant compiled last, where this Triton exposes it."""
    try:
        jit = dense_gemv._gemv_norm if norm else dense_gemv._gemv
        cache = next(iter(jit.device_caches.values()))[0]
        kernel = list(cache.values())[-1]
        kernel._init_handles()
        return kernel.n_regs, kernel.n_spills
    except Exception:  # noqa: BLE001 -- informative only
        return None, None


def row(case: Case, who: str, us: float, cfg, regs=(None, None)) -> dict:
    gbs = case.n * case.k * 2 / us / 1e3
    return {"kind": case.kind, "rows": case.rows, "who": who, "us": round(us, 2), "weight_GB_s": round(gbs),
            "pct_copy": round(100 * gbs / COPY_GBS, 1), "config": cfg, "regs": regs[0], "spill_bytes": regs[1]}


def sweep(case: Case, configs: list[dict], use_pdl: bool, deadline: float) -> list[dict]:
    """Every config that compiles and computes the right result, fastest first (until the deadline)."""
    rows = []
    for i, cfg in enumerate(configs):
        if time.perf_counter() > deadline:
            print(f"  {case.kind} rows={case.rows}: time budget spent after {i} of {len(configs)} configs")
            break
        try:
            case.check(case.gemv(cfg))
            regs = _registers(case.norm)
            rows.append(row(case, "triton", bench(case.gemv(cfg), use_pdl), cfg, regs))
        except Exception as exc:  # noqa: BLE001 -- a config that does not compile or run: skip it
            print(f"  skip {cfg}: {type(exc).__name__}: {str(exc)[:120]}")
    return sorted(rows, key=lambda r: r["us"])


def baselines(case: Case, use_pdl: bool) -> list[dict]:
    """The engine's pick, the default, the old autotuned kernel, cuBLAS, and (folded kind) the unfolded pair."""
    out = []
    picked = dense_gemv.pick_config(case.n, case.k, case.rows, case.norm, case.w[0])
    default = dense_gemv.default_config(case.n, case.k, case.norm)
    for who, make in (("engine pick", lambda: (case.gemv(None), picked)),
                      ("default", lambda: (case.gemv(default), default)), ("autotune (before)", case.autotuned),
                      ("cuBLAS" + (" + norm kernel" if case.norm else ""), lambda: (case.cublas(), None)),
                      *((("norm kernel + engine GEMV", lambda: (case.pair(), None)),) if case.norm else ())):
        try:
            step, cfg = make()
            case.check(step)
            out.append(row(case, who, bench(step, use_pdl), cfg if isinstance(cfg, dict) or cfg is None
                           else {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}))
        except Exception as exc:  # noqa: BLE001
            print(f"  {who}: {type(exc).__name__}: {str(exc)[:160]}")
    return out


SHORT = {"BLOCK_N": "BN", "BLOCK_K": "BK", "num_warps": "warps", "num_stages": "stages", "ROWS": "rows/program"}


def show(rows: list[dict]) -> None:
    for r in rows:
        cfg = r["config"] or {}
        shape = " ".join(f"{SHORT.get(k, k)}={v}" for k, v in cfg.items())
        regs = f"{r['regs']} regs {r['spill_bytes']} spill" if r["regs"] is not None else ""
        print(f"  {r['kind']:9} T={r['rows']} {r['who']:26} {r['us']:7.2f} us {r['weight_GB_s']:6} GB/s "
              f"{r['pct_copy']:5.1f}%  {shape} {regs}", flush=True)


def device_name() -> str:
    return torch.cuda.get_device_name() if DEV == "cuda" else "cpu"


def write_table(best: dict) -> Path:
    """Merges {shape_key: {rows: config}} into this GPU's bf16 table (other shapes kept)."""
    path = dense_gemv.CONFIG_DIR / dense_gemv.table_name(torch.bfloat16, device_name())
    table = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    for key, by_rows in best.items():
        table.setdefault(key, {}).update(by_rows)
    path.write_text(json.dumps(dict(sorted(table.items())), indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return path


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--top", type=int, default=8, help="rows 2: the fastest TOP configs of rows 1")
    ap.add_argument("--pdl", action="store_true", help="launch with PDL as the engine does at batch 1")
    ap.add_argument("--budget-s", type=float, default=100.0, help="sweep time over all kinds (baselines aside)")
    ap.add_argument("--write", action="store_true", help="merge the winners into the config table")
    ap.add_argument("--out", type=Path, help="results JSON (default benchmarks/results/dense-gemv-sweep-<GPU>.json)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, every 8th config: the code paths only")
    args = ap.parse_args()
    if DEV == "cpu" and not (args.smoke and os.environ.get("TRITON_INTERPRET") == "1"):
        ap.error("without CUDA only --smoke under TRITON_INTERPRET=1 runs")
    return args


def run(args: argparse.Namespace, started: float) -> tuple[dict, list[dict]]:
    """The table's winners {shape_key: {rows: config}} and every timed row."""
    kinds = args.kinds.split(",")
    best, everything = {}, []
    for j, kind in enumerate(kinds):
        deadline = started + args.budget_s * (j + 1) / len(kinds)  # each kind its share of the budget
        n, k, norm = KINDS[kind]
        configs = candidates(k)[::8 if args.smoke else 1]
        for rows in (1, 2):
            case = Case(kind, rows)
            swept = sweep(case, configs, args.pdl, deadline if rows == 1 else float("inf"))
            others = baselines(case, args.pdl)
            show(swept[:5] + others)
            everything += swept + others
            if swept:
                best.setdefault(dense_gemv.shape_key(n, k, norm), {})[str(rows)] = swept[0]["config"]
            # rows 2: the fastest of rows 1, with both rows in each program and with one program per row
            configs = [c for r in swept[:args.top] for c in (r["config"], {**r["config"], "ROWS": 1})]
            del case
    return best, everything


def main() -> int:
    global LAYERS
    args, started = _args(), time.perf_counter()
    if args.smoke:
        LAYERS = 2
        KINDS.update(qkv_norm=(40, 256, True), qkv=(40, 256, False), o=(24, 512, False))
    best, everything = run(args, started)
    print(json.dumps(best, indent=1))
    if args.write:
        print("wrote", write_table(best))
    out = args.out or RESULTS / f"dense-gemv-sweep-{device_name().split()[-1].lower()}.json"
    meta = {"machine": device_name(), "host": platform.platform(), "torch": torch.__version__,
            "triton": triton.__version__, "command": "python3 " + " ".join(sys.argv), "pdl": args.pdl,
            "seconds": round(time.perf_counter() - started, 1), "best": best}
    out.write_text(json.dumps({"meta": meta, "rows": everything}, indent=1) + "\n", encoding="utf-8")
    print("wrote", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
