"""One MoE layer on the GPU: tune the fused Triton kernels per token count, then time them beside torch._grouped_mm.

    tune:  for each token count T, every candidate block config of each kernel (gate_up, down) timed alone;
           the best per (T, kernel) written to moemesh/runtime/gpu/configs/<shape>.json (what fused_moe reads)
    bench: the whole fused layer (align + 2 GEMMs + sum, replayed as a CUDA graph) and ExpertBank's torch path
           (sort + torch._grouped_mm, eager) at T tokens; bytes = the distinct experts' weights actually routed to
           + activations; % of the measured device copy bandwidth; TFLOP/s for the prefill size

Weights rotate over several layers so that repeated runs do not read from L2 (60 MB on an H200).
`--tune-for int4` (or fp8, int8) tunes the tables of quantized weights, in their own config file (`dtype=int4`);
without one, quantized weights use the bf16 tables. int4 rows: a byte per two weights + a float32 scale per 128.

    PYTHONPATH=. python3 benchmarks/moe_kernel.py --tune --out benchmarks/results      # on the H200, ~3 min
    PYTHONPATH=. python3 benchmarks/moe_kernel.py --tune-gemv --tune-for int4 --quantizations none,int4
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

TUNE_TOKENS = (1, 4, 16, 32, 64, 128, 256, 1024, 4096)
BENCH_TOKENS = (1, 8, 16, 32, 64, 128, 4096)


def candidates(tokens: int, int4: bool = False) -> list[dict]:
    """int4: BLOCK_K is always the 128-column scale group (the kernel steps K one group at a time)."""
    if tokens <= 128:
        grid = itertools.product((16,), (32, 64, 128), (128,) if int4 else (128, 256), (1,), (4,), (3, 4))
    else:
        grid = itertools.product((32, 64, 128), (64, 128), (128,) if int4 else (64,), (8,), (4, 8), (3,))
    keys = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")
    configs = [dict(zip(keys, values)) for values in grid]
    # int4: both ways of turning codes into floats (int4_kernels._int4_mac's MAGIC), the faster one per size
    return [{**c, "MAGIC": m} for c in configs for m in (False, True)] if int4 else configs


def expert_bytes(scheme: str, h: int, inter: int) -> float:
    """HBM bytes of one expert's gate, up and down weights with their scales."""
    weights = 3 * inter * h
    if scheme == "none":
        return weights * 2
    if scheme == "int4":
        return weights / 2 + weights / 128 * 4  # + a float32 scale per 128 columns
    return weights + (2 * inter + h) * 4  # + a float32 scale per output channel


def routing(t: int, e: int, k: int, dev: str = "cuda"):
    weights, ids = torch.randn(t, e, device=dev).softmax(-1).topk(k, dim=-1)
    return ids, weights / weights.sum(-1, keepdim=True)


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second."""
    import triton

    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=20, rep=200, return_mode="median")
    return 2 * src.numel() / (ms * 1e-3)


def dense_limits(t: int, k: int, h: int, inter: int) -> dict[str, float]:
    """TFLOP/s of cuBLAS bf16 GEMMs as limits for the prefill row: a large square GEMM (the measured peak), and the
    MoE layer's FLOPs at T tokens as two dense GEMMs (all T*K rows through one expert: no grouping, no gather)."""
    import triton

    def tflops(m: int, n: int, kk: int) -> float:
        a = torch.randn(m, kk, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(kk, n, device="cuda", dtype=torch.bfloat16)
        ms = triton.testing.do_bench(lambda: a @ b, warmup=10, rep=100, return_mode="median")
        return 2 * m * n * kk / ms / 1e9

    rows = t * k
    up, down = tflops(rows, 2 * inter, h), tflops(rows, h, inter)
    flops = 2 * rows * (2 * inter * h + h * inter)
    both = flops / (2 * rows * 2 * inter * h / up + 2 * rows * h * inter / down)
    return {"square_8192": round(tflops(8192, 8192, 8192), 1), "dense_same_flops": round(both, 1)}


def layers_of_weights(n: int, e: int, h: int, i: int):
    gen = [(torch.randn(e, 2 * i, h, device="cuda", dtype=torch.bfloat16) * 0.02,
            torch.randn(e, h, i, device="cuda", dtype=torch.bfloat16) * 0.02) for _ in range(n)]
    return gen


def tune(layers, k: int) -> dict[int, dict]:
    import triton

    from moemesh.runtime.gpu.fused_moe import moe_gemm
    from moemesh.runtime.gpu.moe_align import align

    from moemesh.runtime.quant import QuantTensor

    e, two_i, h = layers[0][0].shape
    int4 = isinstance(layers[0][0], QuantTensor) and layers[0][0].scheme == "int4"
    table = {}
    for t in TUNE_TOKENS:
        ids, weights = routing(t, e, k)
        hidden = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
        act = torch.randn(t * k, two_i // 2, device="cuda", dtype=torch.bfloat16)
        best = {}
        for kind in ("gate_up", "down"):
            timed = []
            for cfg in candidates(t, int4):
                al = align(ids, e, cfg["BLOCK_M"])
                it = itertools.cycle(layers)

                def run():
                    gu, dn = next(it)
                    if kind == "gate_up":
                        moe_gemm(hidden, gu, act, al, k, cfg, up_rows=two_i // 2)
                    else:
                        moe_gemm(act, dn, torch.empty(t * k, h, device="cuda"), al, 1, cfg, weights=weights.view(-1))
                try:
                    timed.append((triton.testing.do_bench(run, warmup=5, rep=25, return_mode="median"), cfg))
                except Exception as exc:  # out of shared memory / registers for this tile: skip it
                    print(f"  skip {kind} {cfg}: {type(exc).__name__}", flush=True)
            best[kind] = min(timed, key=lambda x: x[0])[1]
            print(f"T={t} {kind}: {min(timed, key=lambda x: x[0])[0] * 1e3:.1f} us {best[kind]}", flush=True)
        table[t] = best
    return table


def tune_gemv(layers, k: int) -> dict[str, dict]:
    """Best GEMV block shape per kernel at 1 token (the GEMV path serves up to GEMV_MAX_PAIRS pairs); int4 steps
    hold a quarter of bf16's bytes per column, so its candidates step 2-8x more columns."""
    import triton

    from moemesh.runtime.gpu.fused_moe import moe_gemv
    from moemesh.runtime.quant import QuantTensor

    e, two_i, h = layers[0][0].shape
    int4 = isinstance(layers[0][0], QuantTensor) and layers[0][0].scheme == "int4"
    ids, weights = routing(1, e, k)
    ids = ids.reshape(-1).contiguous()
    hidden = torch.randn(1, h, device="cuda", dtype=torch.bfloat16)
    act = torch.randn(k, two_i // 2, device="cuda", dtype=torch.bfloat16)
    y = torch.empty(k, h, device="cuda")
    best = {}
    for kind in ("gemv_gate_up", "gemv_down"):
        timed = []
        for bn, bk, warps, stages in itertools.product((8, 16, 32), (512, 1024, 2048) if int4 else (256, 512), (4, 8),
                                                       (3,)):
            cfg = {"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps, "num_stages": stages}
            it = itertools.cycle(layers)

            def run():
                gu, dn = next(it)
                if kind == "gemv_gate_up":
                    moe_gemv(hidden, gu, act, ids, k, cfg, up_rows=two_i // 2)
                else:
                    moe_gemv(act, dn, y, ids, 1, cfg, weights=weights.view(-1))
            timed.append((triton.testing.do_bench(run, warmup=5, rep=25, return_mode="median"), cfg))
        us, best[kind] = min(timed, key=lambda x: x[0])
        print(f"T=1 {kind}: {us * 1e3:.1f} us {best[kind]}", flush=True)
    return best


def bench(layers, k: int, bandwidth: float, scheme: str = "none") -> list[dict]:
    """Rows of the fused layer with experts in bf16 (beside torch._grouped_mm) or quantized (fp8/int8: 1 byte per
    weight + a float32 scale per output channel; int4: half a byte + a float32 scale per 128 weights; dequantized
    in the kernel)."""
    import triton

    from moemesh.runtime.gpu.fused_moe import fused_moe
    from moemesh.runtime.experts import GROUPED_MM
    from moemesh.runtime.quant import quantize

    e, two_i, h = layers[0][0].shape
    inter = two_i // 2
    per_expert = expert_bytes(scheme, h, inter)
    kernel_layers = layers if scheme == "none" else [(quantize(gu, scheme), quantize(dn, scheme)) for gu, dn in layers]
    label = "fused_moe (triton, graph)" if scheme == "none" else f"fused_moe {scheme} (triton, graph)"
    rows = []
    for t in BENCH_TOKENS:
        ids, weights = routing(t, e, k)
        hidden = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
        graphs = []
        for gu, dn in kernel_layers:  # one graph per layer of weights: replays rotate through them (no L2 reuse)
            fused_moe(hidden, gu, dn, ids, weights)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fused_moe(hidden, gu, dn, ids, weights)
            graphs.append(g)
        it = itertools.cycle(graphs)
        fused_ms = triton.testing.do_bench(lambda: next(it).replay(), warmup=10, rep=100, return_mode="median")
        flat = ids.reshape(-1)
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=e)
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        x = hidden[order // k]
        lit = itertools.cycle(layers)

        def grouped():  # the torch path's two grouped GEMMs on pre-sorted rows (FACTS.md's "plain grouped_mm")
            gu, dn = next(lit)
            y = GROUPED_MM(x, gu.transpose(1, 2), offs=offs)
            g, u = y.chunk(2, dim=-1)
            return GROUPED_MM((torch.nn.functional.silu(g) * u).contiguous(), dn.transpose(1, 2), offs=offs)

        timed = [(label, fused_ms)]
        if scheme == "none":
            timed.append(("torch._grouped_mm (sorted rows)",
                          triton.testing.do_bench(grouped, warmup=10, rep=100, return_mode="median")))
        distinct = int((counts > 0).sum())
        nbytes = distinct * per_expert + t * h * 2 * 2 + t * k * (inter * 2 * 2 + h * 4)
        flops = 2 * t * k * 3 * inter * h
        for who, ms in timed:
            rows.append({"tokens": t, "who": who, "us": round(ms * 1e3, 1), "experts_touched": distinct,
                         "GB_per_s": round(nbytes / ms / 1e6, 1), "pct_of_copy_bw": round(100 * nbytes / (ms * 1e-3)
                                                                                         / bandwidth, 1),
                         "TFLOP_per_s": round(flops / ms / 1e9, 1)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--inter", type=int, default=768)
    p.add_argument("--tune", action="store_true", help="tune first and write the config JSON")
    p.add_argument("--tune-gemv", action="store_true", help="tune the few-token GEMV kernel into the config JSON")
    p.add_argument("--quantizations", type=lambda s: s.split(","), default=["none", "fp8", "int8", "int4"],
                   help="expert weights to bench: none (bf16), fp8, int8, int4")
    p.add_argument("--tune-for", default="none", choices=("none", "fp8", "int8", "int4"),
                   help="weights --tune / --tune-gemv tune (quantized: their own config file)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args(argv)
    from moemesh.runtime.gpu import fused_moe as fm

    torch.manual_seed(0)
    layers = layers_of_weights(4, args.experts, args.hidden, args.inter)
    tuned_layers, dtype = layers, torch.bfloat16
    if args.tune_for != "none":
        from moemesh.runtime.quant import quantize

        tuned_layers = [(quantize(gu, args.tune_for), quantize(dn, args.tune_for)) for gu, dn in layers]
        dtype = "int4" if args.tune_for == "int4" else tuned_layers[0][0].q.dtype
    name = fm.config_name(args.experts, args.inter, args.hidden, dtype, torch.cuda.get_device_name())
    if args.tune:
        started = time.perf_counter()
        table = {str(t): v for t, v in tune(tuned_layers, args.top_k).items()}
        path = fm.CONFIG_DIR / name
        old = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        for t, entry in old.items():  # keep the GEMV entries (--tune-gemv) of the file being replaced
            table.setdefault(t, {}).update({kind: cfg for kind, cfg in entry.items() if kind.startswith("gemv")})
        text = json.dumps(table, indent=1) + "\n"
        fm.CONFIG_DIR.mkdir(parents=True, exist_ok=True)
        (fm.CONFIG_DIR / name).write_text(text)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / name).write_text(text)
        fm._tuned.cache_clear()
        print(f"tuned in {time.perf_counter() - started:.0f} s -> {name}", flush=True)
    if args.tune_gemv:
        path = fm.CONFIG_DIR / name
        table = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        table.setdefault("1", {}).update(tune_gemv(tuned_layers, args.top_k))
        path.write_text(json.dumps(table, indent=1) + "\n")
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / name).write_text(json.dumps(table, indent=1) + "\n")
        fm._tuned.cache_clear()
    bandwidth = copy_bandwidth()
    rows = [r for scheme in args.quantizations for r in bench(layers, args.top_k, bandwidth, scheme)]
    limits = dense_limits(max(BENCH_TOKENS), args.top_k, args.hidden, args.inter)
    meta = {"machine": torch.cuda.get_device_name(), "copy_TB_per_s": round(bandwidth / 1e12, 2),
            "bf16_spec_TFLOP_per_s": 989.0, "cublas_TFLOP_per_s": limits,
            "torch": torch.__version__, "python": platform.python_version(), "config": name,
            "command": "PYTHONPATH=. python3 " + " ".join(sys.argv)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "moe-kernel-h200.json").write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    lines = [f"# One MoE layer (E {args.experts}, top-{args.top_k}, H {args.hidden}, I {args.inter}, bf16 activations; "
             f"experts: {', '.join(args.quantizations)})", "",
             f"{meta['machine']}, copy bandwidth {meta['copy_TB_per_s']} TB/s; `{meta['command']}`", "",
             f"bf16 limits: spec 989 TFLOP/s (dense, H200 SXM); cuBLAS 8192^3 {limits['square_8192']} TFLOP/s; "
             f"the {max(BENCH_TOKENS)}-token layer's FLOPs as two dense cuBLAS GEMMs (no grouping) "
             f"{limits['dense_same_flops']} TFLOP/s", "",
             "| tokens | who | us | experts touched | GB/s | % of copy bw | TFLOP/s |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['tokens']} | {r['who']} | {r['us']} | {r['experts_touched']} | {r['GB_per_s']} | "
              f"{r['pct_of_copy_bw']} | {r['TFLOP_per_s']} |" for r in rows]
    (args.out / "moe-kernel-h200.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
