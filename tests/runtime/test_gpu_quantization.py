"""FP8/INT8 experts on the GPU: the fused Triton kernels (dequantizing in registers) against the torch path on the
same quantized bank (which dequantizes the layer, then runs bf16 GEMMs), in and out of CUDA graphs and inside the
engine's decode graphs. Needs CUDA (compute capability 8.9+ for fp8) and Triton: run on the H200."""

from __future__ import annotations

import pytest
import torch

from moemesh.runtime.engine import Engine
from moemesh.runtime.experts import ExpertBank
from moemesh.runtime.gpu import kernels_usable
from moemesh.runtime.quant import quantize

from test_gpu_kernels import _assert_replays_with_new_routing, _decode_logits, _qwen3_config, _rel, _routing

WHY = kernels_usable(torch.device("cuda"), torch.bfloat16)
cuda = pytest.mark.skipif(bool(WHY), reason=f"needs CUDA with Triton: {WHY}")
BF16 = torch.bfloat16
SCHEMES = [("int8", None), ("fp8", None), ("fp8", 128)]  # per-channel int8 / fp8, DeepSeek-style 128-column blocks


def _bank(path, scheme, block_k, experts=None):
    """A bf16 dummy bank's weights quantized (block_k None: per channel)."""
    full = ExpertBank.load(path, experts=experts, device="cuda", dtype=BF16, load_format="dummy")
    gate_up = {l: quantize(w, scheme, block_k) for l, w in full.gate_up.items()}
    down = {l: quantize(w, scheme, block_k) for l, w in full.down.items()}
    return ExpertBank(full.spec, full.experts, gate_up, down, BF16)


@cuda
@pytest.mark.parametrize("scheme, block_k", SCHEMES)
@pytest.mark.parametrize("experts", [None, (0, 2, 3, 5, 8, 9, 10, 15)])  # the whole bank, or one shard
def test_quantized_fused_moe_matches_the_dequantized_reference(tmp_path, scheme, block_k, experts, monkeypatch):
    from moemesh.runtime.gpu import prefill_fp8

    # weight-only numerics throughout: from 1,024 tokens on Hopper, fp8 experts otherwise round the activations to
    # e4m3 too (prefill_fp8.py; its own error budget is test_prefill_fp8.py's)
    monkeypatch.setattr(prefill_fp8, "ENABLED", False)
    bank = _bank(_qwen3_config(tmp_path), scheme, block_k, experts)
    assert bank.fused_off == "" and bank.quantization == scheme
    for t in (1, 7, 64, 300, 1100):  # GEMV (<= 32 pairs), one-launch align, sorted align (> 4096 pairs)
        hidden = torch.randn(t, 256, device="cuda", dtype=BF16)
        ids, weights = _routing(t, 16, 4)
        ids[0, -1] = -1
        got = bank.forward(1, hidden, ids, weights)
        bank.fused_off = "reference"  # torch path: dequantize the layer to bf16, grouped GEMMs
        want = bank.forward(1, hidden, ids, weights)
        bank.fused_off = ""
        assert got.dtype == BF16 and _rel(got, want) < 2e-2, (t, _rel(got, want))


@cuda
def test_loaded_fp8_bank_is_close_to_bf16_and_half_the_bytes(tmp_path):
    path = _qwen3_config(tmp_path)
    fp8 = ExpertBank.load(path, device="cuda", dtype=BF16, load_format="dummy", quantization="fp8")
    bf16 = ExpertBank.load(path, device="cuda", dtype=BF16, load_format="dummy")
    assert fp8.weight_bytes < 0.52 * bf16.weight_bytes
    hidden = torch.randn(64, 256, device="cuda", dtype=BF16)
    ids, weights = _routing(64, 16, 4)
    assert _rel(fp8.forward(0, hidden, ids, weights), bf16.forward(0, hidden, ids, weights)) < 0.08


@cuda
@pytest.mark.parametrize("tokens", [8, 20])  # the GEMV path and the aligned GEMM path
@pytest.mark.parametrize("scheme, block_k", SCHEMES)
def test_quantized_fused_moe_replays_in_a_cuda_graph(tmp_path, tokens, scheme, block_k):
    bank = _bank(_qwen3_config(tmp_path), scheme, block_k)
    _assert_replays_with_new_routing(bank, tokens)


@cuda
@pytest.mark.parametrize("scheme", ["fp8", "int8"])
def test_quantized_decode_graphs_match_the_torch_reference(tmp_path, scheme):
    path = _qwen3_config(tmp_path)
    kw = dict(load_format="dummy", device="cuda", dtype=BF16, kv_blocks=64, block_size=16, quantization=scheme)
    graphs, reference = Engine.load(path, **kw), Engine.load(path, **kw)
    reference.decode = None  # gathered context + SDPA, torch experts (dequantized) and ops
    reference.dispatch.bank.fused_off = "reference"
    reference.backbone.set_fast(False)
    assert graphs.info.cuda_graphs.startswith("on") and graphs.info.quantization == scheme
    prompts = [[3 + i] * (5 + 9 * i) for i in range(3)]
    want = _decode_logits(reference, prompts, 12)
    got = _decode_logits(graphs, prompts, 12)
    assert all(_rel(g, w) < 3e-2 for g, w in zip(got, want)), [_rel(g, w) for g, w in zip(got, want)]
