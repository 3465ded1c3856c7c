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

from graph_timing import graph_us, int4_expert_layers, write_json
from moemesh.runtime.gpu.fused_moe import moe_gemv, pick_config
from moemesh.runtime.gpu.int4_q8 import q8_gemv, quantize_rows

E, INTER, H, K, LAYERS = 128, 768, 2048, 8, 12


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    torch.manual_seed(0)
    layers = int4_expert_layers(E, INTER, H, LAYERS)
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


if __name__ == "__main__":
    main()
