"""Attention of one layer for steps of several sequences (Qwen3-30B-A3B heads: 32 q / 4 kv, head_dim 128, 16-token
KV blocks), in one run: the paged prefill kernel (gpu/prefill_attention.py), the padded SDPA path with the explicit
mask it replaced (step_context.py: gather + pad + mask, as on the CPU), each sequence alone through SDPA's causal
kernel (one launch per sequence), and the FLOP limit at 989 TFLOP/s. Also the error against the padded path.
`--kv fp8`: the paged kernel over an fp8 cache (K [slots, Hkv, D], V [blocks, Hkv, D, 16] e4m3, kv_cache.py) beside
the same bf16 rows on those values widened (files *-fp8.*).

    source benchmarks/h200/setup.sh && python3 benchmarks/h200/prefill_attention.py [--kv fp8] --out $OUT
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention.bias import causal_lower_right

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from moemesh.runtime.gpu.prefill_attention import CONFIG, prefill_attention, tiles  # noqa: E402
from moemesh.runtime.kv_cache import FP8, narrow, to_token_minor  # noqa: E402
from moemesh.runtime.step_context import StepContext  # noqa: E402

HQ, HKV, D, BS = 32, 4, 128, 16
GRID = [{**CONFIG, **d} for d in ({"BLOCK_N": 128}, {"num_stages": 3}, {"ROWS": 128, "num_warps": 8},
                                  {"num_warps": 8}, {"BLOCK_N": 32}, {"ROWS": 128, "BLOCK_N": 128, "num_warps": 8,
                                   "num_stages": 3})]
CASES = {  # name: (cached, new) per sequence
    "chunk 448 at 1,600 + 64 decodes at 2,000": ([1600] + [2000] * 64, [448] + [1] * 64),
    "4 prompts of 1,024": ([0] * 4, [1024] * 4),
    "8 prompts of 128-1,024": ([0] * 8, [128, 256, 384, 512, 640, 768, 896, 1024]),
    "2 chunks of 2,048 at 2,048": ([2048] * 2, [2048] * 2),
}


def case(cached: list[int], new: list[int]):
    blocks = [-(-(c + n) // BS) for c, n in zip(cached, new)]
    perm = torch.randperm(sum(blocks)).tolist()
    tables, used = [], 0
    for count in blocks:
        tables.append(perm[used:used + count])
        used += count
    ctx = StepContext.build(cached, new, tables, BS, "cuda")
    k_pool = torch.randn(sum(blocks) * BS, HKV, D, device="cuda", dtype=torch.bfloat16)
    v_pool = torch.randn_like(k_pool)
    q = torch.randn(sum(new), HQ, D, device="cuda", dtype=torch.bfloat16)
    return ctx, q, k_pool, v_pool


def padded(ctx, q, k_pool, v_pool):
    k, v = k_pool[ctx.ctx_index], v_pool[ctx.ctx_index]  # [B, Tk, Hkv, D]
    out = F.scaled_dot_product_attention(ctx.pad_queries(q).transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=ctx.mask, scale=D ** -0.5, enable_gqa=True)
    return ctx.unpad(out.transpose(1, 2))


def alone(ctx, q, k_pool, v_pool, cached, new):
    outs, row = [], 0
    for b, (c, n) in enumerate(zip(cached, new)):
        idx = ctx.ctx_index[b, :c + n]
        k, v = k_pool[idx].transpose(0, 1)[None], v_pool[idx].transpose(0, 1)[None]
        outs.append(F.scaled_dot_product_attention(q[row:row + n].transpose(0, 1)[None], k, v,
                                                   attn_mask=causal_lower_right(n, c + n), scale=D ** -0.5,
                                                   enable_gqa=True)[0].transpose(0, 1))
        row += n
    return torch.cat(outs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kv", default="bf16", choices=("bf16", "fp8"), help="the cache the paged kernel reads")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args(argv)
    torch.manual_seed(0)
    rows, sweep = [], []
    for name, (cached, new) in CASES.items():
        ctx, q, kp, vp = case(cached, new)
        tile_list = ctx.tiles(HQ // HKV)
        cache = (kp, vp)
        if args.kv == "fp8":  # the kernel reads e4m3; the torch rows read the same values in bf16
            cache = (narrow(kp, FP8), to_token_minor(narrow(vp, FP8).view(torch.uint8), BS).view(FP8))
            kp, vp = narrow(kp, FP8).to(q.dtype), narrow(vp, FP8).to(q.dtype)

        def ours():
            return prefill_attention(q, *cache, ctx.table, ctx.starts, ctx.new, ctx.cached, tile_list, BS, D ** -0.5)
        want = padded(ctx, q, kp, vp)
        err = ((ours().float() - want.float()).norm() / want.float().norm()).item()
        flops = sum(4 * n * (c + (n + 1) / 2) * D * HQ for c, n in zip(cached, new))  # causal: half the square
        r = {"case": name, "error_vs_padded": round(err, 5), "limit_us": round(flops / 989e12 * 1e6, 1)}
        for who, fn in (("paged_kernel", ours), ("padded_sdpa_mask", lambda: padded(ctx, q, kp, vp)),
                        ("sdpa_per_sequence", lambda: alone(ctx, q, kp, vp, cached, new))):
            r[f"{who}_us"] = round(triton.testing.do_bench(fn, warmup=5, rep=40, return_mode="median") * 1e3, 1)
        rows.append(r)
        print(json.dumps(r), flush=True)
        for cfg in GRID:  # the kernel's configs on this step
            t = tiles(list(new), HQ // HKV, "cuda", cfg["ROWS"])
            try:
                us = triton.testing.do_bench(lambda: prefill_attention(q, *cache, ctx.table, ctx.starts, ctx.new,
                                                                       ctx.cached, t, BS, D ** -0.5, cfg),
                                             warmup=5, rep=40, return_mode="median") * 1e3
            except Exception as exc:  # noqa: BLE001 -- out of shared memory / registers: skip it
                print(f"  skip {cfg}: {type(exc).__name__}", flush=True)
                continue
            sweep.append({"case": name, "config": cfg, "us": round(us, 1)})
            print(f"  {us:8.1f} us {cfg}", flush=True)
    meta = {"machine": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "command": "python3 benchmarks/h200/prefill_attention.py " + " ".join(argv or sys.argv[1:])}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "prefill-attention-h200" + ("-fp8" if args.kv == "fp8" else "")
    (args.out / f"{stem}.json").write_text(json.dumps({**meta, "rows": rows, "sweep": sweep},
                                                                     indent=1) + "\n")
    lines = [f"# One layer's attention, steps of several sequences (32 q / 4 kv heads, D 128), {args.kv} cache, us", "",
             f"{meta['machine']}; `{meta['command']}`; torch {meta['torch']}, triton {meta['triton']}", "",
             "| step | paged kernel | padded SDPA + mask (before) | SDPA per sequence | FLOP limit | rel err |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['paged_kernel_us']} | {r['padded_sdpa_mask_us']} | {r['sdpa_per_sequence_us']} | "
              f"{r['limit_us']} | {r['error_vs_padded']} |" for r in rows]
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
