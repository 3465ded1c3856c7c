"""int4 expert GEMVs at one token on activations rounded once per row (gpu/int4_q8.py) beside today's dp4a GEMVs
(gpu/moe_kernels._moe_gemv, the int4 table's configs) in one run: each kernel alone and the whole chain, 12 layers'
weights in one CUDA graph with PDL as a batch-1 step launches them; microseconds per layer, plus the HBM limit.

    PYTHONPATH=. python3 benchmarks/h200/int4_q8.py [--out DIR]
"""

from __future__ import annotations

import argparse
import itertools
import pathlib

import torch
import triton
import triton.language as tl

from graph_timing import graph_us, expert_layers, write_json
from moemesh.runtime.gpu import pdl
from moemesh.runtime.gpu.fused_moe import moe_gemv, pick_config
from moemesh.runtime.gpu.int4_kernels import _int4_words
from moemesh.runtime.gpu.pdl import enter
from moemesh.runtime.gpu.int4_q8 import q8_gemv, quantize_rows

E, INTER, H, K, LAYERS = 128, 768, 2048, 8, 12


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--sweep", action="store_true", help="also sweep the q8 GEMVs' block shapes")
    ap.add_argument("--tokens", type=lambda s: [int(x) for x in s.split(",")], default=None,
                    help="instead: fused_moe at these token counts (random routing) with q8, dp4a and the GEMM")
    args = ap.parse_args()
    torch.manual_seed(0)
    layers = expert_layers(E, INTER, H, LAYERS)
    if args.tokens:
        rows = by_tokens(layers, args.tokens)
        write_json(pathlib.Path(args.out) / "int4-q8-tokens-h200.json", rows=rows)
        return
    ids = torch.randperm(E, device="cuda")[:K].long()
    weights = torch.rand(K, device="cuda")
    hidden = torch.randn(1, H, device="cuda", dtype=torch.bfloat16)
    act = torch.empty(K, INTER, device="cuda", dtype=torch.bfloat16)
    out = torch.zeros(1, H, device="cuda")
    gu_bytes, dn_bytes = K * 2 * INTER * H * (0.5 + 4 / 128), K * H * INTER * (0.5 + 4 / 128)
    limit = {"gate_up": gu_bytes / 4.8e6, "down": dn_bytes / 4.8e6}  # us at the H200's 4.8 TB/s
    rows = []

    def record(kind, variant, us, cfg=None):
        rows.append({"kind": kind, "variant": variant, "us_per_layer": round(us, 2), "cfg": cfg,
                     "hbm_limit_us": round(limit.get(kind, sum(limit.values())), 2)})
        print(f"{kind:8s} {variant:10s} {us:7.2f} us  {cfg or ''}", flush=True)

    cgu, cdn = pick_config(1, "gemv_gate_up", layers[0][0]), pick_config(1, "gemv_down", layers[0][0])
    record("gate_up", "dp4a", graph_us(lambda i: moe_gemv(hidden, layers[i][0], act, ids, K, cgu, up_rows=INTER,
                                                               zero=out), LAYERS, True), cgu)
    record("down", "dp4a", graph_us(lambda i: moe_gemv(act, layers[i][1], out, ids, 1, cdn, weights=weights,
                                                            sum_slots=K), LAYERS, True), cdn)

    def chain_old(i):
        o = torch.empty(1, H, device="cuda")
        moe_gemv(hidden, layers[i][0], act, ids, K, cgu, up_rows=INTER, zero=o)
        return moe_gemv(act, layers[i][1], o, ids, 1, cdn, weights=weights, sum_slots=K)
    record("chain", "dp4a", graph_us(chain_old, LAYERS, True))
    ref = chain_old(0).clone()

    floors(record, layers, ids)
    token_chains(rows, record, layers, hidden, ids, weights, ref)
    if not args.sweep:
        write_json(pathlib.Path(args.out) / "int4-q8-h200.json", rows=rows)
        return
    best = {}
    for g in (8, 32, 64):
        xq, xs = quantize_rows(hidden, g)
        record("quantize", f"G{g}", graph_us(lambda i: quantize_rows(hidden, g), LAYERS, True))
        for bn, bk, warps in itertools.product((8, 16, 32), (512, 1024, 2048), (2, 4, 8)):
            cfg = {"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps}
            aq = torch.empty(K, INTER, dtype=torch.int8, device="cuda")
            asteps = torch.empty(K, INTER // bn, device="cuda")
            try:
                us = graph_us(lambda i: q8_gemv(xq, xs, layers[i][0], ids, K, cfg, aq, out_steps=asteps,
                                                up_rows=INTER, zero=out), LAYERS, True)
            except Exception as exc:  # noqa: BLE001 -- a tile that does not fit
                print("skip", cfg, type(exc).__name__, str(exc)[:200])
                continue
            record("gate_up", f"q8 G{g}", us, cfg)
            if us < best.get(("gate_up", g), (1e9,))[0]:
                best[("gate_up", g)] = (us, cfg)
    aq8 = {}
    for bn_in in (8, 16, 32):  # the act group = gate_up's BLOCK_N
        aq = torch.randint(-127, 128, (K, INTER), dtype=torch.int8, device="cuda")
        asteps = torch.rand(K, INTER // bn_in, device="cuda") / 100
        aq8[bn_in] = (aq, asteps)
        for bn, bk, warps in itertools.product((8, 16, 32), (256, 512), (2, 4)):
            cfg = {"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps}
            try:
                us = graph_us(lambda i: q8_gemv(aq, asteps, layers[i][1], ids, 1, cfg, out, weights=weights,
                                                sum_slots=K), LAYERS, True)
            except Exception as exc:  # noqa: BLE001
                print("skip", cfg, type(exc).__name__, str(exc)[:200])
                continue
            record("down", f"q8 G{bn_in}", us, cfg)
            if us < best.get(("down", bn_in), (1e9,))[0]:
                best[("down", bn_in)] = (us, cfg)
    for g in (8, 32, 64):
        gcfg = best[("gate_up", g)][1]
        dcfg = best[("down", gcfg["BLOCK_N"])][1]
        aq = torch.empty(K, INTER, dtype=torch.int8, device="cuda")
        asteps = torch.empty(K, INTER // gcfg["BLOCK_N"], device="cuda")

        def chain(i, g=g, gcfg=gcfg, dcfg=dcfg, aq=aq, asteps=asteps):
            o = torch.empty(1, H, device="cuda")
            xq, xs = quantize_rows(hidden, g)
            q8_gemv(xq, xs, layers[i][0], ids, K, gcfg, aq, out_steps=asteps, up_rows=INTER, zero=o)
            return q8_gemv(aq, asteps, layers[i][1], ids, 1, dcfg, o, weights=weights, sum_slots=K)
        us = graph_us(chain, LAYERS, True)
        got = chain(0)
        err = ((got - ref).norm() / ref.norm()).item()
        record("chain", f"q8 G{g}", us, {"gate_up": gcfg, "down": dcfg, "rel_err_vs_dp4a": round(err, 4)})
    out_dir = pathlib.Path(args.out)
    write_json(out_dir / "int4-q8-h200.json", rows=rows)


@triton.jit
def _read_only(b_ptr, ids_ptr, out_ptr, stride_be, stride_bn, up_rows, K: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr, GATED: tl.constexpr, PDL: tl.constexpr = False):
    """The q8 GEMV's weight reads and nothing else (words xor-reduced, one int per program): its memory floor."""
    enter(PDL)
    pair = tl.program_id(0)
    cols = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    expert = tl.load(ids_ptr + pair)
    rows = b_ptr + expert * stride_be + cols * stride_bn
    acc = tl.zeros((BLOCK_N, BLOCK_K // 128, 16), dtype=tl.int32)
    for k0 in tl.static_range(0, K, BLOCK_K):
        acc ^= _int4_words(rows, cols < up_rows, k0, K, BLOCK_K)
        if GATED:
            acc ^= _int4_words(rows + up_rows * stride_bn, cols < up_rows, k0, K, BLOCK_K)
    tl.store(out_ptr + pair * tl.num_programs(1) + tl.program_id(1), tl.sum(tl.reshape(acc, (BLOCK_N * BLOCK_K // 8,)), 0))


def floors(record, layers, ids) -> None:
    """Pure weight reads with the q8 GEMVs' grids, 12 layers in a PDL graph: what their access pattern costs."""
    sink = torch.empty(1 << 16, dtype=torch.int32, device="cuda")
    for kind, bn, bk, warps in (("gate_up", 8, 1024, 2), ("gate_up", 8, 1024, 4), ("gate_up", 16, 1024, 4),
                                ("gate_up", 32, 1024, 8), ("down", 16, 512, 2), ("down", 32, 256, 4),
                                ("down", 8, 256, 2)):
        gated, k_in, n = (True, H, INTER) if kind == "gate_up" else (False, INTER, H)

        def run(i, bn=bn, bk=bk, warps=warps, gated=gated, k_in=k_in, n=n):
            w = layers[i][0 if gated else 1].q
            _read_only[(K, n // bn)](w, ids, sink, w.stride(0), w.stride(1), n, K=k_in, BLOCK_N=bn, BLOCK_K=bk,
                                     GATED=gated, num_warps=warps, **pdl.launch())
        record(kind, "read only", graph_us(run, LAYERS, True), {"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps})


def token_chains(rows, record, layers, hidden, ids, weights, ref) -> None:
    """The one-token chain as the H200 table's q8 configs run it: quantize_rows + q8 gate_up + q8 down."""
    gcfg = {"G": 32, "BLOCK_N": 8, "BLOCK_K": 1024, "num_warps": 2}
    dcfg = {"BLOCK_N": 16, "BLOCK_K": 512, "num_warps": 2}
    aq = torch.empty(K, INTER, dtype=torch.int8, device="cuda")
    asteps = torch.empty(K, INTER // 8, device="cuda")

    def two_gemvs(i):
        o = torch.empty(1, H, device="cuda")
        xq, xs = quantize_rows(hidden, 32)
        q8_gemv(xq, xs, layers[i][0], ids, K, gcfg, aq, out_steps=asteps, up_rows=INTER, zero=o)
        return q8_gemv(aq, asteps, layers[i][1], ids, 1, dcfg, o, weights=weights, sum_slots=K)
    record("chain", "q8 gemvs", graph_us(two_gemvs, LAYERS, True), {"gate_up": gcfg, "down": dcfg})


def by_tokens(layers, counts: list[int]) -> list[dict]:
    """One MoE layer (us, 12 layers' weights in one PDL graph, routing random per token) at each token count: the q8
    GEMVs (int4_q8.moe_q8, any count), fused_moe as it runs without them (MOEMESH_INT4_Q8=0: the dp4a GEMVs up to
    their MAX_PAIRS, then the table's swapped-operand GEMM or GEMM) and fused_moe's GEMM alone (the table's configs
    passed in)."""
    from moemesh.runtime.gpu import fused_moe as fm
    from moemesh.runtime.gpu.int4_q8 import moe_q8
    rows = []
    gu0 = layers[0][0]
    q8 = fm.q8_configs(gu0)

    def without_q8(fn):
        def run(i):
            fm.Q8_ON = False
            try:
                return fn(i)
            finally:
                fm.Q8_ON = True
        return run
    for t in counts:
        hidden = torch.randn(t, H, device="cuda", dtype=torch.bfloat16)
        weights, ids = torch.randn(t, E, device="cuda").softmax(-1).topk(K)
        flat_ids, flat_w = ids.reshape(-1).contiguous(), weights.reshape(-1).contiguous()
        gemm = (fm.pick_config(t, "gate_up", gu0), fm.pick_config(t, "down", gu0))
        ways = {"q8": lambda i: moe_q8(hidden, layers[i][0], layers[i][1], flat_ids, flat_w, *q8),
                "without_q8": without_q8(lambda i: fm.fused_moe(hidden, layers[i][0], layers[i][1], ids, weights)),
                "gemm": lambda i: fm.fused_moe(hidden, layers[i][0], layers[i][1], ids, weights, configs=gemm)}
        row = {"tokens": t, "experts_touched": int(ids.unique().numel())}
        for name, fn in ways.items():
            row[name + "_us"] = round(graph_us(fn, LAYERS, t <= 8), 2)
        print(row, flush=True)
        rows.append(row)
    return rows


if __name__ == "__main__":
    main()
