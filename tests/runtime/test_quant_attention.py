"""Quantized attention projections (Engine.load(quantize_attention=True), quant.quantize_attention,
gpu/quant_linear.py): the wiring on the CPU reference path, the GEMV under Triton's interpreter, and on CUDA the
kernels against the dequantized weights and the engine's decode graphs against its torch reference."""

from __future__ import annotations

import textwrap

import pytest
import torch

from moemesh.runtime.attention import Attention
from moemesh.runtime.engine import Engine
from moemesh.runtime.quant import QuantLinear
from moemesh.runtime.types import SequenceWork

from interpreted import cuda, interpreter, run_interpreted
from test_gpu_kernels import _decode_logits, _qwen3_config, _rel

BF16 = torch.bfloat16


def test_quantized_attention_is_the_engine_with_dequantized_attention_weights(tmp_path):
    """CPU: the int4+attention engine's logits equal those of the int4 engine given the dequantized projections
    (the same function, so the wiring is right), and differ from the unquantized projections' (so it is on)."""
    path = _qwen3_config(tmp_path)
    kw = dict(load_format="dummy", kv_blocks=16, block_size=4, quantization="int4")
    quant, plain = Engine.load(path, quantize_attention=True, **kw), Engine.load(path, **kw)
    assert quant.info.quantization == "int4+attention" and plain.info.quantization == "int4"
    def works(name):  # a new sequence each time: the same prompt from position 0
        return [SequenceWork(name, [5, 9, 11, 3], 0)]

    before = plain.step_with_logits(works("a"))[1]
    for qa, pa in zip(quant.backbone.layers, plain.backbone.layers):
        assert isinstance(qa.attn, Attention) and isinstance(qa.attn.o_proj, QuantLinear)
        qkv = qa.attn.qkv_quant.weight_q.dequantize(torch.float32)  # [Nq + 2 Nkv, H], q/k/v_proj are its rows
        parts = [getattr(qa.attn, f"{p}_proj").weight_q.dequantize(torch.float32) for p in "qkv"]
        assert torch.equal(torch.cat(parts), qkv)
        for p, w in zip("qkv", parts):
            getattr(pa.attn, f"{p}_proj").weight.data.copy_(w)
        pa.attn.o_proj.weight.data.copy_(qa.attn.o_proj.weight_q.dequantize(torch.float32))
    got, want = quant.step_with_logits(works("b"))[1], plain.step_with_logits(works("b"))[1]
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert 1e-3 < _rel(got, before) < 0.5, _rel(got, before)  # int4 moves random weights' logits (0.22 here)


def test_quantize_attention_needs_a_quantization(tmp_path):
    with pytest.raises(ValueError, match="quantize_attention needs quantization"):
        Engine.load(_qwen3_config(tmp_path), load_format="dummy", kv_blocks=4, block_size=4, quantize_attention=True)


CHECK = textwrap.dedent('''
    import torch
    from moemesh.runtime.gpu.quant_linear import quant_linear
    from moemesh.runtime.quant import quantize

    torch.manual_seed(0)
    w = torch.randn(24, 320) / 10  # K not a whole number of 128-column blocks
    rows = torch.zeros(8, dtype=torch.int64)
    bias = torch.randn(24, dtype=torch.bfloat16)
    for scheme, tol in (("int4", 3e-2), ("int8", 1e-2)):
        q = quantize(w, scheme)
        for t in (1, 2, 5):  # the GEMV (int4 on dp4a: x rounded to int8), then dequantized + F.linear
            x = torch.randn(t, 320, dtype=torch.bfloat16)
            want = x.float() @ q.dequantize(torch.float32).T + bias.float()
            got = quant_linear(x, q, bias, rows)
            assert got.shape == (t, 24) and got.dtype == torch.bfloat16
            rel = ((got.float() - want).norm() / want.norm()).item()
            assert rel < tol, (scheme, t, rel)
    print("ok")
''')


@interpreter
def test_quant_linear_under_the_interpreter():
    run_interpreted(CHECK)


@cuda
@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_quant_linear_on_cuda_matches_the_dequantized_weight(scheme):
    from moemesh.runtime.gpu.quant_linear import quant_linear
    from moemesh.runtime.quant import quantize

    torch.manual_seed(0)
    q = quantize(torch.randn(5120, 2048, device="cuda") / 45, scheme)  # Qwen3-30B-A3B's q/k/v
    rows = torch.zeros(8, dtype=torch.int64, device="cuda")
    for t in (1, 2, 3, 64):
        x = torch.randn(t, 2048, device="cuda", dtype=BF16)
        want = x.float() @ q.dequantize(torch.float32).T
        got = quant_linear(x, q, None, rows)
        assert _rel(got, want) < (3e-2 if t <= 2 and scheme == "int4" else 1e-2), (t, _rel(got, want))


@cuda
@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_quantized_attention_decode_graphs_match_the_torch_reference(tmp_path, scheme):
    path = _qwen3_config(tmp_path)
    kw = dict(load_format="dummy", device="cuda", dtype=BF16, kv_blocks=64, block_size=16, quantization=scheme,
              quantize_attention=True)
    graphs, reference = Engine.load(path, **kw), Engine.load(path, **kw)
    reference.decode = None  # gathered context + SDPA, torch experts (dequantized) and ops
    reference.dispatch.bank.fused_off = "reference"
    reference.backbone.set_fast(False)
    assert graphs.info.cuda_graphs.startswith("on") and graphs.info.quantization == f"{scheme}+attention"
    prompts = [[3 + i] * (5 + 9 * i) for i in range(3)]
    want = _decode_logits(reference, prompts, 12)
    got = _decode_logits(graphs, prompts, 12)
    assert all(_rel(g, w) < 4e-2 for g, w in zip(got, want)), [_rel(g, w) for g, w in zip(got, want)]
