"""kv_cache_dtype "fp8": e4m3 KV pools (kv_cache.py). On the CPU: what a store keeps, the blocks a budget buys, and
an engine whose cached prefill and decode steps give the logits of scoring the whole sequence with K/V rounded as
the cache holds them (and not the float32 cache's). Under Triton's interpreter: the decode norm/rope kernel's fp8
writes, paged decode and paged prefill attention over fp8 pools. On a GPU: the graphs and Triton kernels against the
torch path with the same fp8 cache."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

from interpreted import E4M3_SHIM, PAGED_REFERENCE, cuda, interpreter, run_interpreted
from moemesh.runtime.engine import Engine
from moemesh.runtime.kv_cache import FP8, FP8_MAX, KVCache, gather, narrow, store
from moemesh.runtime.types import SequenceWork


def test_store_keeps_the_nearest_e4m3_saturated_and_gather_reads_it_back():
    pool = torch.zeros(8, 2, 4, dtype=FP8)
    x = torch.tensor([[[1.0, -0.3, 1e5, -1e5], [448.0, 500.0, 2.0**-9, 0.0]]] * 2)
    store(pool, torch.tensor([6, 1]), x)
    back = gather(pool, torch.tensor([1, 6, 0])).float()
    want = x.clamp(-FP8_MAX, FP8_MAX).to(FP8).float()
    assert torch.equal(back[:2], torch.stack([want[1], want[0]])) and not back.isnan().any()
    assert back[0, 0, 2] == FP8_MAX and back[0, 0, 3] == -FP8_MAX and back[0, 0, 1] == torch.tensor(-0.3).to(FP8).float()
    assert torch.equal(back[2], torch.zeros(2, 4)), "untouched slots stay zero"
    assert torch.equal(narrow(x, torch.float32), x), "a model-dtype cache keeps values as they are"
    blocks = torch.zeros(4, 2, 4, 2, dtype=FP8)  # the fp8 V pool: blocks of 2 tokens, tokens innermost
    store(blocks, torch.tensor([6, 1]), x)
    assert torch.equal(gather(blocks, torch.tensor([1, 6, 0])).float(), back)
    assert torch.equal(blocks[3, :, :, 0].float(), want[0]) and torch.equal(blocks[0, :, :, 1].float(), want[1])


def test_fp8_cache_buys_as_many_more_blocks_as_its_bytes_are_fewer(tiny_hf):
    path, _ = tiny_hf("qwen3_moe")
    full, fp8 = (Engine.load(path, kv_memory_bytes=2**20, kv_cache_dtype=kv) for kv in ("auto", "fp8"))
    assert (full.info.kv_cache_dtype, fp8.info.kv_cache_dtype) == ("float32", "fp8")
    assert all(p.dtype == FP8 for pools in fp8.cache.pools for p in pools)
    shapes, layers = fp8.backbone.cache_shapes(), fp8.spec.num_layers
    per_block = fp8.blocks.block_size * KVCache.bytes_per_token(layers, shapes, FP8)
    assert (fp8.info.kv_blocks_total, full.info.kv_blocks_total) == (2**20 // per_block, 2**20 // (4 * per_block))


def _teacher_forced(engine, prompt: list[int], follow: list[int]) -> torch.Tensor:
    """Logits [1 + len(follow), V]: the prompt's prefill (last row), then one decode step per token of `follow`."""
    rows = [engine.step_with_logits([SequenceWork("s", prompt, 0)])[1][-1]]
    for i, token in enumerate(follow):
        rows.append(engine.step_with_logits([SequenceWork("s", [token], len(prompt) + i)])[1][-1])
    return torch.stack(rows)


def test_cached_steps_attend_over_the_fp8_rounded_keys_and_values(tiny_hf):
    path, _ = tiny_hf("qwen3_moe")
    prompt, follow = [5 + (7 * i) % 90 for i in range(21)], [3, 14, 15, 92, 65, 35]  # crosses a 16-token block
    fp8, full = (Engine.load(path, kv_blocks=8, block_size=16, kv_cache_dtype=kv) for kv in ("fp8", "auto"))
    got = _teacher_forced(fp8, prompt, follow)
    whole = fp8.forward_logits([prompt + follow])[0][len(prompt) - 1:]  # no cache: K/V rounded as the cache would
    assert (got - whole).abs().max() < 1e-4, (got - whole).abs().max()
    exact = _teacher_forced(full, prompt, follow)
    assert (got - exact).abs().max() > 1e-3, "the fp8 cache changed nothing: was it used?"
    assert (got.argmax(-1) == exact.argmax(-1)).float().mean() >= 0.8


def test_unserved_kv_cache_dtypes_fail_at_load_naming_the_field(tiny_hf):
    path, _ = tiny_hf("qwen3_moe")
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, fp8, got 'int8'"):
        Engine.load(path, kv_blocks=2, kv_cache_dtype="int8")
    mla, _ = tiny_hf("deepseek_v2")
    with pytest.raises(ValueError, match="kv_cache_dtype 'fp8' serves grouped-query attention"):
        Engine.load(mla, kv_blocks=2, kv_cache_dtype="fp8")


CHECKS = E4M3_SHIM + PAGED_REFERENCE + textwrap.dedent('''
    import torch
    import torch.nn.functional as F
    from moemesh.runtime.gpu import norm_rope, paged_attention, prefill_attention as pa
    from moemesh.runtime.kv_cache import FP8, gather, narrow, to_token_minor
    from moemesh.runtime.step_context import StepContext

    torch.manual_seed(0)
    t, hq, hk, d = 3, 4, 2, 16
    qkv = torch.randn(t, (hq + 2 * hk) * d) * 200  # some K/V past 448: saturated
    ref = qkv.clone()
    cos, sin = torch.randn(t, d), torch.randn(t, d)
    kp, slots = torch.zeros(12, hk, d, dtype=FP8), torch.tensor([3, 7, 0])
    vp = torch.zeros(3, hk, d, 4, dtype=FP8)  # V: blocks of 4 tokens, tokens innermost
    norm_rope.norm_rope_(qkv, hq, hk, d, None, None, 0.0, cos, sin, (kp, vp, slots))
    norm_rope.norm_rope_(ref, hq, hk, d, None, None, 0.0, cos, sin)
    k_want = narrow(ref[:, hq * d:(hq + hk) * d].reshape(t, hk, d), FP8)
    v_want = narrow(ref[:, (hq + hk) * d:].reshape(t, hk, d), FP8)
    assert torch.equal(kp.view(torch.uint8)[slots], k_want.view(torch.uint8)), "K written as e4m3"
    assert torch.equal(gather(vp, slots).view(torch.uint8), v_want.view(torch.uint8)), "V written as e4m3"
    assert int((vp.view(torch.uint8) != 0).sum()) == int((v_want.view(torch.uint8) != 0).sum()), "only its slots"
    assert kp.float().abs().max() == 448.0, "saturated, not NaN"

    b, hq, hkv, d, bs = 2, 8, 2, 16, 4
    kpool, vslots = (narrow(torch.randn(64, hkv, d) * 3, FP8) for _ in range(2))
    vpool = to_token_minor(vslots.view(torch.uint8), bs).view(FP8)
    tables = torch.randperm(16)[:8].view(2, 4).int()
    lens = torch.tensor([13, 5], dtype=torch.int32)
    q = torch.randn(b, hq, d)
    want = paged_reference(q, kpool.float(), vslots.float(), tables, lens, bs, 0.25)
    for splits in (1, 4):
        got = paged_attention.paged_decode_attention(q, kpool, vpool, tables, lens, 0.25, bs, block_n=4,
                                                     splits=splits)
        err = ((got - want).norm() / want.norm()).item()  # q in fp16 (pre-scaled): 2^-11 relative
        assert err < 2e-3, ("paged decode over fp8 pools", splits, err)

    hq, hkv, d, bs, slots = 8, 2, 32, 16, 16 * 16
    cached, new = [0, 40, 3], [37, 1, 20]
    perm = torch.randperm(16).tolist()
    tables, used = [], 0
    for c, n in zip(cached, new):
        tables.append(perm[used:used + -(-(c + n) // bs)])
        used += len(tables[-1])
    ctx = StepContext.build(cached, new, tables, bs, "cpu")
    k_pool, v_slots = (narrow(torch.randn(slots, hkv, d) * 2, FP8) for _ in range(2))
    v_pool = to_token_minor(v_slots.view(torch.uint8), bs).view(FP8)
    q = torch.randn(sum(new), hq, d, dtype=torch.float16)
    got = pa.prefill_attention(q, k_pool, v_pool, ctx.table, ctx.starts, ctx.new, ctx.cached, ctx.tiles(hq // hkv),
                               bs, d ** -0.5)
    k_ctx, v_ctx = (p.view(torch.uint8)[ctx.ctx_index].view(FP8).float() for p in (k_pool, v_slots))
    want = F.scaled_dot_product_attention(ctx.pad_queries(q.float()).transpose(1, 2), k_ctx.transpose(1, 2),
                                          v_ctx.transpose(1, 2), attn_mask=ctx.mask, scale=d ** -0.5, enable_gqa=True)
    err = (got.float() - ctx.unpad(want.transpose(1, 2))).abs().max().item()
    assert err < 3e-3, ("paged prefill over fp8 pools", err)
    print("ok")
''')


@interpreter
def test_fp8_pools_under_the_triton_interpreter():
    run_interpreted(CHECKS)


def _qwen3(tmp_path):
    config = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 1000,
              "hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2,
              "head_dim": 64, "intermediate_size": 512, "moe_intermediate_size": 128, "num_experts": 16,
              "num_experts_per_tok": 4, "norm_topk_prob": True, "rms_norm_eps": 1e-6,
              "max_position_embeddings": 4096, "tie_word_embeddings": False, "eos_token_id": 2}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


@cuda
def test_gpu_decode_graphs_and_paged_prefill_over_an_fp8_cache_match_the_torch_path(tmp_path):
    """Graph-replayed decode (the norm/rope kernel's fp8 writes, paged decode) and a 200-row two-prompt prefill
    (paged prefill attention) against the torch path (store/gather + SDPA) over the same fp8 cache."""
    kw = dict(load_format="dummy", device="cuda", dtype=torch.bfloat16, kv_blocks=64, block_size=16,
              kv_cache_dtype="fp8")
    path = _qwen3(tmp_path)
    fast, reference = Engine.load(path, **kw), Engine.load(path, **kw)
    reference.decode = None
    reference.dispatch.bank.fused_off = "reference"
    reference.backbone.set_fast(False)
    assert fast.info.cuda_graphs.startswith("on") and fast.info.kv_cache_dtype == "fp8"
    prompts = [[3 + i % 50 for i in range(120)], [9 + i % 40 for i in range(80)]]
    logits = []
    for engine in (fast, reference):
        works = [SequenceWork(f"s{i}", p, 0) for i, p in enumerate(prompts)]
        rows = [engine.step_with_logits(works)[1]]
        for step in range(18):  # crosses a block boundary
            works = [SequenceWork(f"s{i}", [7 + step], len(p) + step) for i, p in enumerate(prompts)]
            rows.append(engine.step_with_logits(works)[1])
        logits.append(rows)
    rel = [((g.float() - w.float()).norm() / w.float().norm()).item() for g, w in zip(*logits)]
    # A K/V value the two paths compute a bf16 ulp apart can land on either side of an e4m3 rounding boundary (a
    # 2^-4 step), so single steps spread further than with a bf16 cache (H200: about 1e-2, one step of 19 at 3.3e-2).
    assert max(rel) < 5e-2 and sum(rel) / len(rel) < 2e-2, rel


@cuda
def test_gpu_widen_gives_torchs_fp16_for_every_e4m3_byte():
    """paged_attention.widen's inline PTX (cvt.rn.f16x2.e4m3x2 on each half of a word of 4 bytes) in element order."""
    import triton
    import triton.language as tl

    from moemesh.runtime.gpu.paged_attention import widen

    @triton.jit
    def _widen_all(src, dst, N: tl.constexpr):
        i = tl.arange(0, N)
        tl.store(dst + i, widen(tl.load(src + i), tl.float16, True))

    codes = torch.arange(256, dtype=torch.uint8, device="cuda").view(16, 16).T.contiguous().view(-1)  # mixed order
    out = torch.empty(256, dtype=torch.float16, device="cuda")
    _widen_all[(1,)](codes, out, N=256)
    want = codes.view(FP8).to(torch.float16)
    same = (out == want) | (out.isnan() & want.isnan())
    assert same.all(), [(int(c), float(o), float(w)) for c, o, w in zip(codes[~same], out[~same], want[~same])][:8]
