"""GPU path (moemesh/runtime/gpu): fused MoE against ExpertBank's torch path, paged decode attention against SDPA,
decode steps in CUDA graphs against the eager engine. Needs CUDA and Triton: run on the H200."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from moemesh.runtime.dispatch import LocalDispatch
from moemesh.runtime.engine import Engine
from moemesh.runtime.experts import ExpertBank
from moemesh.runtime.gpu import kernels_usable, triton_available
from moemesh.runtime.types import SequenceWork

cuda = pytest.mark.skipif(bool(kernels_usable(torch.device("cuda"), torch.bfloat16)),
                          reason=f"needs CUDA with Triton: {kernels_usable(torch.device('cuda'), torch.bfloat16)}")
# The Triton-interpreter checks of the GPU kernels run on CPU machines (CI): a GPU runs the compiled kernels in the
# `cuda` tests instead (and the GPU image's Triton 3.6 interpreter differs from the CPU venv's 3.9).
interpreter = pytest.mark.skipif(not triton_available() or torch.cuda.is_available(),
                                 reason="a Triton-interpreter check for a CPU machine with Triton; on a GPU the "
                                 "compiled kernels are checked by the cuda tests")
BF16 = torch.bfloat16


def _qwen3_config(tmp_path, experts=16, top_k=4, layers=2):
    config = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 1000,
              "hidden_size": 256, "num_hidden_layers": layers, "num_attention_heads": 8, "num_key_value_heads": 2,
              "head_dim": 64, "intermediate_size": 512, "moe_intermediate_size": 128, "num_experts": experts,
              "num_experts_per_tok": top_k, "norm_topk_prob": True, "rms_norm_eps": 1e-6,
              "max_position_embeddings": 4096, "tie_word_embeddings": False, "eos_token_id": 2}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def _rel(a, b):
    """Relative error; a shard's reference can be all zeros (every selected expert hosted elsewhere): then absolute."""
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-6)).item()


def _routing(t, e, k, device="cuda"):
    logits = torch.randn(t, e, device=device)
    weights, ids = logits.softmax(-1).topk(k, dim=-1)
    return ids, weights / weights.sum(-1, keepdim=True)


def test_cpu_engine_says_why_there_are_no_graphs(tmp_path):
    engine = Engine.load(_qwen3_config(tmp_path), load_format="dummy", kv_blocks=4, block_size=4)
    assert engine.info.cuda_graphs == "off: device cpu is not CUDA"
    assert engine.decode is None and engine.dispatch.bank.fused_off == "device cpu is not CUDA"


@cuda
@pytest.mark.parametrize("experts", [None, (0, 2, 3, 5, 8, 9, 10, 15)])  # the whole bank, or one shard
def test_fused_moe_matches_the_torch_path(tmp_path, experts):
    bank = ExpertBank.load(_qwen3_config(tmp_path), experts=experts, device="cuda", dtype=BF16, load_format="dummy")
    assert bank.fused_off == ""
    for t in (1, 7, 64, 300, 1100):  # GEMV (<= 32 pairs), one-launch align, sorted align (> 4096 pairs)
        hidden = torch.randn(t, 256, device="cuda", dtype=BF16)
        ids, weights = _routing(t, 16, 4)
        ids[0, -1] = -1  # an unused slot
        got = bank.forward(1, hidden, ids, weights)
        bank.fused_off = "reference"
        want = bank.forward(1, hidden, ids, weights)
        bank.fused_off = ""
        assert got.dtype == BF16 and _rel(got, want) < 2e-2, (t, _rel(got, want))


@cuda
@pytest.mark.parametrize("tokens", [8, 20])  # the GEMV path and the aligned GEMM path
def test_fused_moe_replays_in_a_cuda_graph_with_new_routing(tmp_path, tokens):
    bank = ExpertBank.load(_qwen3_config(tmp_path), device="cuda", dtype=BF16, load_format="dummy")
    _assert_replays_with_new_routing(bank, tokens)


def _assert_replays_with_new_routing(bank, tokens):
    """bank.forward of layer 0 captured in a CUDA graph, replayed after new hidden states and routing were copied
    into the captured inputs, equals an eager call on them (hidden 256, 16 experts, top 4: _qwen3_config)."""
    hidden = torch.randn(tokens, 256, device="cuda", dtype=BF16)
    ids, weights = _routing(tokens, 16, 4)
    bank.forward(0, hidden, ids, weights)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = bank.forward(0, hidden, ids, weights)
    new_ids, new_weights = _routing(tokens, 16, 4)
    hidden.normal_()
    ids.copy_(new_ids)
    weights.copy_(new_weights)
    graph.replay()
    assert _rel(out, bank.forward(0, hidden, ids, weights)) < 1e-3


@cuda
def test_paged_decode_attention_matches_sdpa():
    from moemesh.runtime.gpu.paged_attention import paged_decode_attention

    hq, hkv, d, bs, lens = 32, 4, 128, 16, [1, 17, 130, 64]
    pool_k = torch.randn(64 * bs, hkv, d, device="cuda", dtype=BF16)
    pool_v = torch.randn_like(pool_k)
    order = torch.randperm(64).tolist()
    tables = torch.zeros(len(lens), 16, dtype=torch.int32, device="cuda")
    q = torch.randn(len(lens), hq, d, device="cuda", dtype=BF16)
    used = 0
    for b, n in enumerate(lens):
        blocks = order[used:used + -(-n // bs)]
        used += len(blocks)
        tables[b, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
    got = paged_decode_attention(q, pool_k, pool_v, tables, torch.tensor(lens, dtype=torch.int32, device="cuda"),
                                 d**-0.5, bs)
    for b, n in enumerate(lens):
        slots = torch.tensor([int(tables[b, j // bs]) * bs + j % bs for j in range(n)], device="cuda")
        want = F.scaled_dot_product_attention(q[b, :, None].unsqueeze(0), pool_k[slots].transpose(0, 1)[None],
                                              pool_v[slots].transpose(0, 1)[None], enable_gqa=True)[0, :, 0]
        assert _rel(got[b], want) < 1e-2, (b, n)


def _decode_logits(engine, prompts, steps):
    """Teacher-forced: prefill, then `steps` decode steps feeding token 7 + step; logits of every step."""
    works = [SequenceWork(f"s{i}", p, 0) for i, p in enumerate(prompts)]
    out = [engine.step_with_logits(works)[1]]
    pos = [len(p) for p in prompts]
    for step in range(steps):
        works = [SequenceWork(f"s{i}", [7 + step + i], pos[i]) for i in range(len(prompts))]
        out.append(engine.step_with_logits(works)[1])
        pos = [p + 1 for p in pos]
    return out


@cuda
@pytest.mark.parametrize("batch", [1, 5, 7, 9])  # 5, 7: padded to the bucket of 8, 9 to 16
def test_decode_graphs_match_the_eager_engine(tmp_path, batch):
    path = _qwen3_config(tmp_path)
    kw = dict(load_format="dummy", device="cuda", dtype=BF16, kv_blocks=64, block_size=16)
    graphs, eager, reference = (Engine.load(path, **kw), Engine.load(path, cuda_graphs=False, **kw),
                                Engine.load(path, **kw))
    reference.decode = None  # the pre-GPU path: gathered context + SDPA, torch experts and ops
    reference.dispatch.bank.fused_off = "reference"
    reference.backbone.set_fast(False)
    assert graphs.info.cuda_graphs.startswith("on") and eager.info.cuda_graphs.startswith("off: disabled")
    prompts = [[3 + i] * (5 + 9 * i) for i in range(batch)]
    want = _decode_logits(reference, prompts, 20)  # crosses a KV block boundary
    for engine in (graphs, eager):
        got = _decode_logits(engine, prompts, 20)
        assert all(_rel(g, w) < 3e-2 for g, w in zip(got, want)), [_rel(g, w) for g, w in zip(got, want)]
    # the prompts' prefill (one row per token: 5 -> bucket 8; 5 + 14 + ... + 41 = 115 -> 128; ... + 59 = 224 -> 256;
    # ... + 77 = 369 -> 512) and the decode steps
    assert sorted(graphs.decode.graphs) == {1: [1, 8], 5: [8, 128], 7: [8, 256], 9: [16, 512]}[batch]


@cuda
def test_prefill_chunks_and_cached_tails_replay_in_the_small_step_graphs(tmp_path):
    """A prompt whose head is in the prefix cache computes its tail as rows of a graph; a short prompt joins a
    decoding sequence in one step: both give the logits of the gathered-context SDPA path."""
    path = _qwen3_config(tmp_path)
    kw = dict(load_format="dummy", device="cuda", dtype=BF16, kv_blocks=64, block_size=16)
    graphs, reference = Engine.load(path, prefix_cache=True, **kw), Engine.load(path, **kw)
    reference.decode = None
    reference.dispatch.bank.fused_off = "reference"
    reference.backbone.set_fast(False)
    head = [11 + i % 50 for i in range(40)]  # two full 16-token blocks become cacheable
    graphs.step_with_logits([SequenceWork("a", head, 0)])
    tail = head[:32] + [5, 6, 7, 8, 9, 10, 11]
    results, got = graphs.step_with_logits([SequenceWork("b", tail, 0)])
    assert results[0].cached_tokens == 32 and 8 in graphs.decode.graphs  # 7 tail rows: bucket 8
    _, want = reference.step_with_logits([SequenceWork("b", tail, 0)])
    assert _rel(got, want) < 3e-2, _rel(got, want)
    reference.step_with_logits([SequenceWork("a", head, 0)])
    # a decode token and a fresh 20-token prompt in one step: 21 rows
    mixed = [SequenceWork("a", [3], 40), SequenceWork("c", [4 + i for i in range(20)], 0)]
    got, want = (e.step_with_logits(mixed)[1] for e in (graphs, reference))
    assert got.shape == want.shape == (2, 1000) and _rel(got, want) < 3e-2, _rel(got, want)
    assert 32 in graphs.decode.graphs


@cuda
def test_a_dispatch_that_cannot_be_captured_runs_eagerly(tmp_path):
    path = _qwen3_config(tmp_path)
    bank = ExpertBank.load(path, device="cuda", dtype=BF16, load_format="dummy")

    class Remote(LocalDispatch):  # stands in for a transport with host round trips
        capturable = False

    dispatch = Remote(bank)
    dispatch.capturable = False
    engine = Engine.load(path, dispatch=dispatch, load_format="dummy", device="cuda", dtype=BF16, kv_blocks=8)
    assert engine.info.cuda_graphs == "off: dispatch Remote cannot be captured (decode runs eagerly)"
    assert engine.decode is not None and not engine.decode.graphs_on


@cuda
def test_one_launch_alignment_groups_the_same_pairs_as_the_torch_one():
    from moemesh.runtime.gpu.moe_align import align, align_small

    for t, k, e, block_m in ((1, 8, 128, 16), (64, 8, 128, 16), (128, 8, 128, 64), (7, 2, 6, 32)):
        ids = _routing(t, e, k)[0]
        ids[0, -1] = -1
        want, got = align(ids, e, block_m), align_small(ids, e, block_m)
        assert torch.equal(want.block_expert, got.block_expert) and torch.equal(want.rows_used, got.rows_used)
        for b in range(want.block_expert.numel()):  # rows within a block may come in any order
            rows = slice(b * block_m, (b + 1) * block_m)
            assert torch.equal(want.sorted_ids[rows].sort().values, got.sorted_ids[rows].sort().values), (t, b)


@cuda
def test_fused_ops_match_their_torch_references():
    from moemesh.runtime.gpu.fused_ops import add_rms_norm, route_softmax
    from moemesh.runtime.gpu.norm_rope import norm_rope_
    from moemesh.runtime.layers import RMSNorm
    from moemesh.runtime.rope import Rotary
    from moemesh.runtime.spec import RopeSpec

    x, d = (torch.randn(33, 2048, device="cuda", dtype=BF16) for _ in range(2))
    w = torch.rand(2048, device="cuda", dtype=BF16) + 0.5
    summed, h = add_rms_norm(x, d, w, 1e-6)
    assert torch.equal(summed, x + d) and _rel(h, RMSNorm(w, 1e-6)(x + d)) < 1e-2
    t, hq, hk, dim = 9, 32, 4, 128
    qkv = torch.randn(t, (hq + 2 * hk) * dim, device="cuda", dtype=BF16)
    qw, kw = (torch.rand(dim, device="cuda", dtype=BF16) + 0.5 for _ in range(2))
    rotary = Rotary(RopeSpec(1e6, dim, False, 40960), "cuda")
    cos, sin = rotary.table(torch.arange(100, 100 + t, device="cuda"), BF16)
    q = rotary.apply(RMSNorm(qw, 1e-6)(qkv[:, :hq * dim].view(t, hq, dim)), cos, sin)
    k = rotary.apply(RMSNorm(kw, 1e-6)(qkv[:, hq * dim:(hq + hk) * dim].view(t, hk, dim)), cos, sin)
    v = qkv[:, (hq + hk) * dim:].clone()
    norm_rope_(qkv, hq, hk, dim, qw, kw, 1e-6, cos.view(t, dim), sin.view(t, dim))
    assert _rel(qkv[:, :hq * dim], q.reshape(t, -1)) < 1e-2 and _rel(qkv[:, hq * dim:(hq + hk) * dim],
                                                                     k.reshape(t, -1)) < 1e-2
    assert torch.equal(qkv[:, (hq + hk) * dim:], v)
    logits = torch.randn(50, 128, device="cuda")
    ids, weights = route_softmax(logits, 8, True, 1.0)
    probs = logits.softmax(-1)
    want_w, want_ids = probs.topk(8, dim=-1)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_w / want_w.sum(-1, keepdim=True))
    counts = torch.full((128,), 5, dtype=torch.int64, device="cuda")  # the expert-load counters, in the same launch
    assert torch.equal(route_softmax(logits, 8, True, 1.0, counts)[0], ids)
    assert torch.equal(counts, 5 + torch.bincount(ids.reshape(-1), minlength=128))


@cuda
def test_norm_rope_writes_the_decode_tokens_kv_into_the_pools():
    from moemesh.runtime.gpu.norm_rope import norm_rope_

    t, hq, hk, dim = 5, 32, 4, 128
    qkv = torch.randn(t, (hq + 2 * hk) * dim, device="cuda", dtype=BF16)
    reference = qkv.clone()
    cos, sin = (torch.randn(t, dim, device="cuda", dtype=BF16) for _ in range(2))
    k_pool, v_pool = (torch.zeros(64, hk, dim, device="cuda", dtype=BF16) for _ in range(2))
    slots = torch.tensor([9, 3, 60, 17, 0], device="cuda")
    norm_rope_(reference, hq, hk, dim, None, None, 0.0, cos, sin)
    norm_rope_(qkv, hq, hk, dim, None, None, 0.0, cos, sin, (k_pool, v_pool, slots))
    assert torch.equal(qkv, reference)
    assert torch.equal(k_pool[slots].reshape(t, -1), reference[:, hq * dim:(hq + hk) * dim])
    assert torch.equal(v_pool[slots].reshape(t, -1), reference[:, (hq + hk) * dim:])
    assert int((k_pool.abs().sum((1, 2)) > 0).sum()) == t  # no other slot written


@cuda
@pytest.mark.parametrize("tokens", [1, 8, 9, 64])  # the Triton GEMV to ROUTER_GEMV_MAX_TOKENS, then cuBLAS
def test_router_logits_match_float32_linear(tokens):
    from moemesh.runtime.gpu.fused_ops import router_logits

    x = torch.randn(tokens, 2048, device="cuda", dtype=BF16)
    w = torch.randn(128, 2048, device="cuda")
    want = x.double() @ w.double().T  # float64: every float32 path (no TF32) lands within its own rounding
    torch.testing.assert_close(router_logits(x, w).double(), want, rtol=1e-4, atol=1e-3)


@cuda
@pytest.mark.parametrize("tokens", [9, 64, 200, 512])  # router_gemm's split-K rows
def test_router_split_k_partials_sum_to_float32_linear_and_route_alike(tokens):
    """The partial sums add up to x @ W^T within float32 rounding (W split in two for TF32), and route_softmax of
    the partials picks what it picks from their sum."""
    from moemesh.runtime.gpu import router_gemm
    from moemesh.runtime.gpu.fused_ops import route_softmax

    x = torch.randn(tokens, 2048, device="cuda", dtype=BF16)
    w = torch.randn(128, 2048, device="cuda") / 45
    part = router_gemm.logits(x, w)
    assert part.shape == (16, tokens, 128)
    torch.testing.assert_close(part.double().sum(0), x.double() @ w.double().T, rtol=1e-4, atol=1e-4)
    ids, weights = route_softmax(part, 8, True, 1.0)
    summed = part[0].clone()
    for p in part[1:]:  # the kernel's order, so the same bits
        summed += p
    want_ids, want_w = route_softmax(summed, 8, True, 1.0)
    assert torch.equal(ids, want_ids) and torch.allclose(weights, want_w, atol=1e-6)


@cuda
@pytest.mark.parametrize("rows,bias", [(1, False), (2, True), (5, False)])  # GEMV rows, and cuBLAS beyond them
def test_dense_gemv_matches_linear(rows, bias):
    from moemesh.runtime.gpu.dense_gemv import linear

    x = torch.randn(rows, 2048, device="cuda", dtype=BF16)
    w = torch.randn(5120, 2048, device="cuda", dtype=BF16) / 45
    b = torch.randn(5120, device="cuda", dtype=BF16) if bias else None
    assert _rel(linear(x, w, b), F.linear(x.float(), w.float(), None if b is None else b.float())) < 1e-2


@cuda
@pytest.mark.parametrize("context", [1, 63, 2000])
def test_split_context_decode_matches_one_program_per_head(context):
    from moemesh.runtime.gpu.paged_attention import paged_decode_attention

    b, hq, hkv, d, bs = 3, 32, 4, 128, 16
    blocks = (context + bs - 1) // bs
    k_pool, v_pool = (torch.randn(3 * blocks * bs + bs, hkv, d, device="cuda", dtype=BF16) for _ in range(2))
    tables = torch.randperm(3 * blocks + 1, device="cuda")[:3 * blocks].view(3, blocks).int()
    lens = torch.tensor([context, max(1, context // 2), 1], device="cuda", dtype=torch.int32)
    q = torch.randn(b, hq, d, device="cuda", dtype=BF16)
    one = paged_decode_attention(q, k_pool, v_pool, tables, lens, d ** -0.5, bs, splits=1)
    for splits in (2, 16):
        split = paged_decode_attention(q, k_pool, v_pool, tables, lens, d ** -0.5, bs, splits=splits)
        assert _rel(split, one) < 1e-2, splits

