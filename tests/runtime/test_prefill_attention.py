"""Paged prefill attention for steps of several sequences (gpu/prefill_attention.py). On a CPU machine the kernel runs
under Triton's interpreter against SDPA with the explicit causal mask over each sequence's gathered context, and
compiles for sm_90 (tensor-core MMA, no spills); on a GPU the engine's mixed steps (prefill chunks beside decode
tokens, past the graph buckets) match the same prompts stepped one sequence at a time."""

from __future__ import annotations

import textwrap

import torch

from interpreted import cuda, interpreter, needs_triton, run_interpreted

CHECKS = textwrap.dedent('''
    import torch
    import torch.nn.functional as F
    from moemesh.runtime.gpu import prefill_attention as pa
    from moemesh.runtime.step_context import StepContext

    torch.manual_seed(0)
    hq, hkv, d, bs, slots = 8, 2, 32, 16, 64 * 16
    cached, new = [0, 100, 20, 5, 0], [37, 1, 70, 1, 3]  # prompts, decode tokens, a chunk after a cache hit
    perm = torch.randperm(64).tolist()  # blocks scattered over the pool
    tables, used = [], 0
    for c, n in zip(cached, new):
        count = -(-(c + n) // bs)
        tables.append(perm[used:used + count])
        used += count
    ctx = StepContext.build(cached, new, tables, bs, "cpu")
    k_pool = torch.randn(slots, hkv, d, dtype=torch.float16)
    v_pool = torch.randn(slots, hkv, d, dtype=torch.float16)
    q = torch.randn(sum(new), hq, d, dtype=torch.float16)
    scale = d ** -0.5
    got = pa.prefill_attention(q, k_pool, v_pool, ctx.table, ctx.starts, ctx.new, ctx.cached, ctx.tiles(hq // hkv),
                               bs, scale)
    k_ctx, v_ctx = k_pool[ctx.ctx_index].float(), v_pool[ctx.ctx_index].float()  # [B, Tk, Hkv, D]
    want = F.scaled_dot_product_attention(ctx.pad_queries(q.float()).transpose(1, 2), k_ctx.transpose(1, 2),
                                          v_ctx.transpose(1, 2), attn_mask=ctx.mask, scale=scale, enable_gqa=True)
    want = ctx.unpad(want.transpose(1, 2))  # [T, Hq, D]
    err = (got.float() - want).abs().max().item()
    assert err < 3e-3, err
    assert sorted(zip(*(x.tolist() for x in ctx.tiles(hq // hkv)))) == sorted(
        [(b, t0) for b, n in enumerate(new) for t0 in range(0, n, pa.ROWS // (hq // hkv))])
    print("ok")
''')


@interpreter
def test_prefill_attention_under_the_triton_interpreter():
    run_interpreted(CHECKS)


def test_shapes_the_kernel_cannot_take_are_refused():
    from moemesh.runtime.gpu.prefill_attention import usable

    assert usable(32, 4, 128) and usable(16, 16, 128) and usable(8, 2, 64)
    assert not usable(32, 4, 96)  # head_dim not a power of two
    assert not usable(12, 4, 128)  # a group of 3: the program's 128 rows are not a multiple of it
    assert not usable(256, 1, 128)  # a group of 256 rows exceeds the program's 128


@needs_triton
def test_prefill_attention_compiles_for_hopper_with_tensor_cores(tmp_path):
    from test_prefill_moe import PTXAS, _ptxas_report, compile_sm90

    from moemesh.runtime.gpu import prefill_attention as pa

    types = {n: "*bf16" for n in ("q_ptr", "k_ptr", "v_ptr", "out_ptr")}
    types.update({n: "*i64" for n in ("table_ptr", "start_ptr", "new_ptr", "cached_ptr")})
    types.update({"tile_seq_ptr": "*i32", "tile_t_ptr": "*i32", "scale": "fp32"})
    cfg = pa.CONFIG
    for fp8 in (False, True):  # fp8: the pools as e4m3 bytes (kv_cache_dtype "fp8"), fp16 dots
        kinds = {**types, **({"k_ptr": "*u8", "v_ptr": "*u8"} if fp8 else {})}
        ptx = compile_sm90(pa._prefill_paged, kinds, dict(GROUP=8, HEAD_DIM=128, KV_BLOCK=16, BLOCK_T=cfg["ROWS"] // 8,
                                                           BLOCK_N=cfg["BLOCK_N"], FP8_KV=fp8), cfg["num_warps"],
                           cfg["num_stages"])
        assert "mma" in ptx and ("cvt.rn.f16x2.e4m3x2" in ptx) == fp8, fp8
        if PTXAS:
            report = _ptxas_report(ptx, tmp_path)
            assert "0 bytes spill stores" in report, (fp8, report)


@cuda
def test_mixed_steps_match_one_sequence_at_a_time(tmp_path):
    """Three prompts (one after a shared-prefix cache hit) and a decode token in one 300-token step, past the graph
    buckets: the paged prefill kernel. Each prompt alone: SDPA's causal kernel. Same logits within bf16 noise."""
    from test_gpu_kernels import _qwen3_config

    from moemesh.runtime.engine import Engine
    from moemesh.runtime.types import SequenceWork

    kw = dict(load_format="dummy", device="cuda", dtype=torch.bfloat16, kv_blocks=256, block_size=16)
    path = _qwen3_config(tmp_path)
    together, alone = Engine.load(path, **kw), Engine.load(path, **kw)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 1000, (n,), generator=gen).tolist() for n in (150, 90, 40)]
    first = [SequenceWork("d", prompts[2][:20], 0)]
    for engine in (together, alone):  # a sequence already decoding
        engine.step(first)
    works = [SequenceWork("a", prompts[0], 0), SequenceWork("b", prompts[1], 0), SequenceWork("d", [5], 20),
             SequenceWork("c", prompts[2], 0)]
    assert sum(len(w.token_ids) for w in works) > 128  # past the graph buckets: the eager step
    _, mixed = together.step_with_logits(works)
    for i, w in enumerate(works):
        _, one = alone.step_with_logits([w])
        rel = ((mixed[i].float() - one[0].float()).norm() / one[0].float().norm()).item()
        assert rel < 2e-2, (w.seq_id, rel)
