"""The residual add + RMSNorm folded into the GEMV after it (dense_gemv.norm_linear: the input norm in the q/k/v
GEMV; fused_ops.router_logits_norm: the post-attention norm in the router logits), used by Backbone._fast_steps at
GEMV sizes. On the CPU the kernels run under Triton's interpreter (in a fresh interpreter: TRITON_INTERPRET must be
set before triton.jit decorates them) against the unfused pair of kernels, bit for bit, and against torch; a whole
fast-path step with and without the fold. On CUDA: decode steps with and without the fold give the same tokens."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from interpreted import needs_triton

from moemesh.runtime.engine import Engine
from moemesh.runtime.gpu import kernels_usable, triton_available
from moemesh.runtime.types import SequenceWork

from test_gpu_kernels import _qwen3_config, _rel

WHY = kernels_usable(torch.device("cuda"), torch.bfloat16)
cuda = pytest.mark.skipif(bool(WHY), reason=f"needs CUDA with Triton: {WHY}")
interpreter = pytest.mark.skipif(
    not triton_available() or torch.cuda.is_available(),
    reason="runs the kernels under Triton's interpreter on CPU tensors, which needs Triton and a machine without "
    "CUDA (with CUDA the engine loads on the GPU); on a GPU the compiled kernels are checked against the same "
    "references by the cuda tests of this file")

KERNELS = textwrap.dedent('''
    import torch
    from moemesh.runtime.gpu import dense_gemv, fused_ops
    from moemesh.runtime.layers import RMSNorm

    torch.manual_seed(0)
    BF = torch.bfloat16
    for t, k, add, d_dtype, bias in ((1, 300, True, torch.float32, True), (2, 128, True, BF, False),
                                     (2, 200, False, BF, True)):
        x, nw = torch.randn(t, k, dtype=BF), torch.rand(k, dtype=BF) + 0.5
        d = torch.randn(t, k, dtype=d_dtype) if add else None
        w, b = torch.randn(50, k, dtype=BF) / 16, torch.randn(50, dtype=BF) if bias else None
        summed, h = fused_ops.add_rms_norm(x, d, nw, 1e-6)  # the unfused pair: add + norm, then the GEMV
        for cfg in (None, {"BLOCK_N": 4, "BLOCK_K": 128, "num_warps": 4}):  # the default (whole K); K steps of 128
            want = dense_gemv.linear(h, w, b, cfg)
            got_x, got = dense_gemv.norm_linear(x, d, nw, 1e-6, w, b, cfg)
            case = f"q/k/v T={t} K={k} add={add} cfg={cfg}"
            assert torch.equal(got, want) and torch.equal(got_x, summed), case + ": bits of the pair"
        ref_x = (x.float() + d.float()).to(BF) if add else x
        ref = torch.nn.functional.linear(RMSNorm(nw, 1e-6)(ref_x).float(), w.float(), None if b is None else b.float())
        # Triton 3.9's interpreter rounds float32 -> bfloat16 toward zero, torch to nearest: one ulp apart at most
        assert ((got_x.float() - ref_x.float()).abs() <= ref_x.float().abs() * 2 ** -7).all(), case + ": x + delta"
        assert (got.float() - ref).norm() / ref.norm() < 1e-2, case + ": torch"

        wr = torch.randn(16, k)  # the gate's float32 weight
        want_l = fused_ops.router_logits(h, wr)
        got_x, got_h, got_l = fused_ops.router_logits_norm(x, d, nw, 1e-6, wr)
        case = f"router T={t} K={k} add={add}"
        assert torch.equal(got_x, summed) and torch.equal(got_h, h) and torch.equal(got_l, want_l), case
        assert (got_l - h.float() @ wr.T).abs().max() < 1e-3, case + ": torch"
        assert (got_h.float() - RMSNorm(nw, 1e-6)(ref_x).float()).abs().max() <= 0.0625, case + ": rmsnorm"
        if add:  # several K steps per program (the router's one-step width is min(4096, K)), other programs
            out, xo, ho = torch.empty(t, 16), torch.empty_like(x), torch.empty_like(x)
            fused_ops._router_logits_norm[(t, 4)](x, d, nw, xo, ho, wr, out, 16, k, 1e-6, ADD=True,
                                                  NORM_BLOCK=1 << (k - 1).bit_length(), BLOCK_E=4, BLOCK_K=64)
            ref_l = torch.empty(t, 16)
            fused_ops._router_logits[(t, 4)](h, wr, ref_l, 16, k, BLOCK_E=4, BLOCK_K=64)
            assert torch.equal(out, ref_l) and torch.equal(xo, summed) and torch.equal(ho, h), case + ", BK 64"

    print("ok")
''')

STEP = textwrap.dedent('''
    import sys
    import torch
    from moemesh.runtime.engine import Engine
    from moemesh.runtime.gpu import fused_ops
    from moemesh.runtime.types import SequenceWork

    calls = []
    pair = fused_ops.add_rms_norm
    def counted(*args):  # counts the unfused add + norm launches, runs them unchanged
        calls.append(1)
        return pair(*args)
    fused_ops.add_rms_norm = counted

    def decode(fold, steps=4):
        torch.manual_seed(0)
        engine = Engine.load(sys.argv[1], load_format="dummy", dtype=torch.bfloat16, kv_blocks=16, block_size=4)
        engine.backbone.set_fast(True)  # the CUDA fast path, its kernels interpreted
        engine.backbone.fold_norms = fold
        prompt = [3, 9, 4, 7, 5]
        out = [engine.step_with_logits([SequenceWork("s", prompt, 0)])[1]]  # 5 rows: no fold
        for i in range(steps):  # 1 row: folded
            del calls[:]
            out.append(engine.step_with_logits([SequenceWork("s", [7 + i], len(prompt) + i)])[1])
        return out, len(calls)

    folded, n_folded = decode(True)
    plain, n_plain = decode(False)
    assert n_folded == 1 and n_plain == 5, (n_folded, n_plain)  # the final norm; or 2 per layer (2) and it
    assert torch.equal(folded[0], plain[0]), "prefill (5 rows) takes the unfused kernels either way"
    for f, p in zip(folded[1:], plain[1:]):  # interpreted, both take one GEMV config: the same bits
        assert torch.equal(f, p), ((f - p).norm() / p.norm()).item()
    print("ok")
''')

DECODE = textwrap.dedent('''
    import sys
    import torch
    from moemesh.runtime.engine import Engine
    from moemesh.runtime.gpu.decode_graphs import DecodeContext

    # float16: Triton 3.9's interpreter gets tl.dot (the paged kernel's) wrong on bfloat16 operands
    engine = Engine.load(sys.argv[1], load_format="dummy", dtype=torch.float16, kv_blocks=16, block_size=4)
    backbone, pools = engine.backbone, engine.cache.pools

    def decode(fast, fold):
        """One token per step through the decode step's path (DecodeContext: K/V written by norm_rope, paged
        attention); positions 0..5 in blocks 0, 1 (slot = position)."""
        backbone.set_fast(fast)
        backbone.fold_norms = fold
        for pool in pools:
            pool[0].zero_(), pool[1].zero_()
        out = []
        for p, token in enumerate([3, 9, 4, 7, 5, 8]):
            at = torch.tensor([p])
            ctx = DecodeContext(at, at, torch.tensor([[0, 1]], dtype=torch.int32),
                                torch.tensor([p + 1], dtype=torch.int32), 4)
            out.append(backbone(torch.tensor([token]), ctx, engine.dispatch, pools))
        return torch.cat(out)  # [6, V] float32

    want = decode(True, False)
    assert torch.equal(decode(True, True), want), "folded norms"
    reference = decode(False, False)  # torch ops around the paged kernel
    assert ((want - reference).norm() / reference.norm()) < 1e-2, ((want - reference).norm() / reference.norm())
    print("ok")
''')


def _interpret(script: str, *args: str) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


@interpreter
def test_folded_norm_kernels_give_the_bits_of_the_unfused_pair():
    _interpret(KERNELS)


@interpreter
def test_a_fast_step_with_the_fold_gives_the_logits_without_it(tmp_path):
    _interpret(STEP, str(_qwen3_config(tmp_path, experts=8, top_k=2)))


@needs_triton
def test_folded_kernels_compile_for_hopper_with_pdl():
    """The q/k/v GEMV's default config (test_dense_gemv: the tuned ones) and the router's compile for sm_90 with
    PDL, without a GPU."""
    from moemesh.runtime.gpu import dense_gemv, fused_ops
    from test_prefill_moe import compile_sm90

    ptrs = {n: "*bf16" for n in ("x_ptr", "nw_ptr", "xo_ptr", "ho_ptr", "w_ptr", "b_ptr", "y_ptr")}
    types = {**ptrs, "d_ptr": "*fp32", "eps": "fp32"}  # delta: the routed experts' float32 output
    config = dense_gemv.default_config(5120, 2048, True)
    consts = dict(HAS_BIAS=False, ADD=True, ROWS=1, NORM_BLOCK=2048, PDL=True, BLOCK_N=config["BLOCK_N"],
                  BLOCK_K=config["BLOCK_K"])
    assert "griddepcontrol.wait" in compile_sm90(dense_gemv._gemv_norm, types, consts, config["num_warps"], 1), config
    types = {**ptrs, "d_ptr": "*bf16", "w_ptr": "*fp32", "out_ptr": "*fp32", "eps": "fp32"}
    consts = dict(ADD=True, NORM_BLOCK=2048, BLOCK_E=1, BLOCK_K=2048, PDL=True)
    assert "griddepcontrol.wait" in compile_sm90(fused_ops._router_logits_norm, types, consts, 4, 1)


@cuda
def test_folded_kernels_match_the_pair_on_cuda():
    from moemesh.runtime.gpu.dense_gemv import linear, norm_linear
    from moemesh.runtime.gpu.fused_ops import add_rms_norm, router_logits, router_logits_norm

    for t in (1, 2):
        x, attn = (torch.randn(t, 2048, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        moe = torch.randn(t, 2048, device="cuda")  # the routed experts' float32 output
        nw = torch.rand(2048, device="cuda", dtype=torch.bfloat16) + 0.5
        w = torch.randn(5120, 2048, device="cuda", dtype=torch.bfloat16) / 45
        gate = torch.randn(128, 2048, device="cuda")
        for delta in (None, moe):
            summed, h = add_rms_norm(x, delta, nw, 1e-6)
            got_x, got = norm_linear(x, delta, nw, 1e-6, w)
            assert torch.equal(got_x, summed) and _rel(got, linear(h, w)) < 1e-2, (t, delta is None)
        summed, h = add_rms_norm(x, attn, nw, 1e-6)
        got_x, got_h, logits = router_logits_norm(x, attn, nw, 1e-6, gate)
        assert torch.equal(got_x, summed) and ((got_h - h).float().abs() <= h.float().abs() * 2 ** -7).all(), t
        torch.testing.assert_close(logits, router_logits(h, gate), rtol=1e-3, atol=1e-2)


@interpreter
def test_decode_steps_fold_with_the_same_bits(tmp_path):
    path = _qwen3_config(tmp_path, experts=8, top_k=2)
    config = json.loads((path / "config.json").read_text())  # smaller still: every program runs in Python here
    config.update(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_attention_heads=4,
                  head_dim=16, vocab_size=256)
    (path / "config.json").write_text(json.dumps(config))
    _interpret(DECODE, str(path))


def _greedy(engine, prompts, steps, forced=None):
    """Greedy decode of every prompt in one batch: the tokens of each step and its logits; forced (another run's
    tokens): fed instead of this run's own, so one near-tie cannot send the two runs apart for good."""
    works = [SequenceWork(f"s{i}", p, 0) for i, p in enumerate(prompts)]
    results, logits = engine.step_with_logits(works)
    tokens, out = [[r.token_id for r in results]], [logits]
    pos = [len(p) for p in prompts]
    for step in range(steps):
        fed = (forced or tokens)[step]
        works = [SequenceWork(f"s{i}", [fed[i]], pos[i]) for i in range(len(prompts))]
        results, logits = engine.step_with_logits(works)
        tokens.append([r.token_id for r in results])
        out.append(logits)
        pos = [p + 1 for p in pos]
    return tokens, out


@cuda
@pytest.mark.parametrize("batch", [1, 2])  # both GEMV sizes, in their CUDA graphs (buckets 1 and 2)
def test_decode_steps_give_the_same_tokens_with_and_without_the_fold(tmp_path, batch):
    """The folded norms give the unfolded kernels' bits where both GEMVs run one config and layout; the tuned table
    gives the folded one its own config (float32 sums in another order), so a token may differ only at a near-tie."""
    path = _qwen3_config(tmp_path, layers=4)
    kw = dict(load_format="dummy", device="cuda", dtype=torch.bfloat16, kv_blocks=64, block_size=16)
    folded, plain = Engine.load(path, **kw), Engine.load(path, **kw)
    plain.backbone.fold_norms = False  # before the first step: the graphs are captured without the fold
    assert folded.info.cuda_graphs.startswith("on")
    prompts = [[3 + i] * (5 + 9 * i) for i in range(batch)]
    got_tokens, got = _greedy(folded, prompts, 24)  # crosses a KV block boundary
    want_tokens, want = _greedy(plain, prompts, 24, forced=got_tokens)
    assert batch in folded.decode.graphs and batch in plain.decode.graphs
    assert all(_rel(g, w) < 1e-2 for g, w in zip(got, want)), [_rel(g, w) for g, w in zip(got, want)]
    ties = [(step, row) for step, (g, w) in enumerate(zip(got_tokens, want_tokens)) for row in range(batch)
            if g[row] != w[row]]
    assert all(want[s][r, got_tokens[s][r]] >= want[s][r].max() - 2e-2 for s, r in ties), ties
    assert len(ties) <= 2, ties
