"""Quantized layouts: int32 packing, compressed-tensors / AWQ / GPTQ read back to the same (q, scale, zero), and bad
configs failing with the tensor and the field named."""

from __future__ import annotations

import pytest
import torch

from moemesh.quant.formats import AWQ_ORDER, QuantConfigError, QuantizedLayout, pack_int32, unpack_int32
from moemesh.quant.gptq import gptq
from moemesh.quant.packing import QWeight, rtn
from moemesh.quant.writer import packed_tensors, quantization_config


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dim", [0, 1])
def test_int32_packing_round_trips(bits: int, dim: int) -> None:
    codes = torch.randint(0, 2**bits, (16, 24), dtype=torch.uint8)
    packed = pack_int32(codes, bits, dim)
    assert packed.dtype == torch.int32 and packed.shape[dim] == codes.shape[dim] * bits // 32
    assert torch.equal(unpack_int32(packed, bits, dim), codes)


@pytest.mark.parametrize("bits", [4, 8])
def test_rtn_error_is_within_half_a_step(bits: int) -> None:
    w = torch.randn(8, 64)
    qw = rtn(w, bits, 32)
    step = qw.scale.repeat_interleave(32, 1)  # [N, K]
    assert ((qw.dequantize() - w).abs() <= step / 2 + 1e-6).all()


def test_gptq_beats_round_to_nearest_on_correlated_inputs() -> None:
    torch.manual_seed(0)
    w, mix = torch.randn(64, 128), torch.randn(128, 128)
    x = torch.randn(1024, 128) @ mix  # correlated features: where GPTQ's error feedback pays
    err = lambda q: ((x @ (q.dequantize() - w).T) ** 2).mean()  # noqa: E731
    assert err(gptq(w, x.T @ x, 4, 32)) < 0.8 * err(rtn(w, 4, 32))


def test_gptq_fits_its_calibration_tokens_when_they_are_fewer_than_its_inputs() -> None:
    """Why QuantSettings.tokens_per_input exists: with n <= K calibration tokens the Hessian has rank <= n, and on
    held-out inputs GPTQ does worse than round-to-nearest; at n = 2K it is clearly better."""
    torch.manual_seed(0)
    w, mix = torch.randn(64, 128), torch.randn(128, 128) / 128**0.5 + torch.eye(128)
    sample = lambda n: torch.randn(n, 128) @ mix  # noqa: E731
    held = sample(4000)
    err = lambda q: float(((held @ (q.dequantize() - w).T) ** 2).mean())  # noqa: E731
    ratio = {n: err(gptq(w, x.T @ x, 4, 32)) / err(rtn(w, 4, 32)) for n in (64, 256) for x in [sample(n)]}
    assert ratio[64] > 1.3 and ratio[256] < 0.85, ratio


def _layout(tensors: dict, config: dict) -> tuple[QuantizedLayout, callable]:
    return QuantizedLayout(config, set(tensors)), tensors.__getitem__


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
def test_compressed_tensors_round_trip(bits: int, symmetric: bool) -> None:
    qw = rtn(torch.randn(40, 64), bits, 32, symmetric)
    tensors = packed_tensors("m.proj", qw, torch.float32, symmetric)
    layout, read = _layout(tensors, quantization_config({bits: ["m.proj"]}, 32, symmetric))
    assert "m.proj.weight" in layout
    back = layout.qweight("m.proj.weight", read)
    assert torch.equal(back.dequantize(), qw.dequantize())


def _awq_pack(t: torch.Tensor) -> torch.Tensor:
    """[R, C] codes -> AutoAWQ's int32 [R, C/8] with columns interleaved in AWQ_ORDER."""
    t = t.view(t.shape[0], -1, 8)[..., list(AWQ_ORDER)].reshape(t.shape[0], -1)
    return pack_int32(t, 4, 1)


def test_awq_gemm_layout_reads_back() -> None:
    qw = rtn(torch.randn(16, 64), 4, 32)
    tensors = {"p.qweight": _awq_pack(qw.q.T.contiguous()), "p.qzeros": _awq_pack(qw.zero.T.contiguous()),
               "p.scales": qw.scale.T.half()}
    layout, read = _layout(tensors, {"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemm"})
    back = layout.qweight("p.weight", read)
    assert torch.allclose(back.dequantize(), rtn_dequant_half(qw))


def rtn_dequant_half(qw: QWeight) -> torch.Tensor:
    return QWeight(qw.q, qw.scale.half().float(), qw.zero, qw.bits, qw.group).dequantize()


def test_gptq_v1_layout_reads_back() -> None:
    qw = rtn(torch.randn(16, 64), 4, 32)
    zeros_v1 = (qw.zero.T.to(torch.int16) - 1).clamp(min=0).to(torch.uint8)  # v1 stores zero - 1
    tensors = {"p.qweight": pack_int32(qw.q.T.contiguous(), 4, 0), "p.qzeros": pack_int32(zeros_v1, 4, 1),
               "p.scales": qw.scale.T.half(), "p.g_idx": torch.arange(64, dtype=torch.int32) // 32}
    layout, read = _layout(tensors, {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False,
                                     "sym": False})
    expected = QWeight(qw.q, qw.scale, qw.zero.clamp(min=1), 4, 32)  # a zero of 0 is not representable in v1
    assert torch.allclose(layout.qweight("p.weight", read).dequantize(), rtn_dequant_half(expected))


def test_missing_scale_names_the_tensor_and_field() -> None:
    tensors = packed_tensors("model.layers.0.mlp.up_proj", rtn(torch.randn(8, 64), 4, 32), torch.float32, False)
    del tensors["model.layers.0.mlp.up_proj.weight_scale"]
    layout, read = _layout(tensors, quantization_config({4: ["model.layers.0.mlp.up_proj"]}, 32, False))
    with pytest.raises(QuantConfigError, match=r"model\.layers\.0\.mlp\.up_proj\.weight_scale.*config_groups"):
        layout.qweight("model.layers.0.mlp.up_proj.weight", read)


def test_wrong_group_size_names_the_tensor_and_field() -> None:
    tensors = packed_tensors("m.down", rtn(torch.randn(8, 64), 4, 32), torch.float32, False)
    layout, read = _layout(tensors, quantization_config({4: ["m.down"]}, 16, False))  # the weights used 32
    with pytest.raises(QuantConfigError, match=r"'m\.down\.weight_scale'.*group_size 16"):
        layout.qweight("m.down.weight", read)


def test_unknown_method_is_refused() -> None:
    with pytest.raises(QuantConfigError, match="quant_method 'bitsandbytes'"):
        QuantizedLayout({"quant_method": "bitsandbytes"}, set())


def test_the_quantizer_runs_gptq_only_with_enough_tokens_per_input() -> None:
    from moemesh.quant.calibration import Hessians
    from moemesh.quant.quantizer import QuantSettings, _quantize

    torch.manual_seed(0)
    w, x = torch.randn(16, 64), torch.randn(100, 64)  # 100 tokens for 64 inputs: 1.6 per input
    hessians = Hessians()
    hessians.add(["l.weight"], x)
    q = {ratio: _quantize(w, "l.weight", 4, 32, QuantSettings(method="gptq", tokens_per_input=ratio), hessians).q
         for ratio in (1.5, 2.0)}
    assert torch.equal(q[1.5], gptq(w, x.T @ x, 4, 32).q) and torch.equal(q[2.0], rtn(w, 4, 32).q)


def test_a_group_size_that_does_not_divide_k_falls_back_to_a_power_of_two_divisor() -> None:
    """SmolLM2: --group-size 128 on K = 576 -> 64 (MatMulNBits wants powers of two >= 16); K = 1536 keeps 128."""
    from moemesh.quant.quantizer import QuantSettings, _group

    s = QuantSettings(group_size=128)
    assert _group(576, "w", s) == 64 and _group(1536, "w", s) == 128 and _group(192, "w", s) == 64
    with pytest.raises(ValueError, match=r"--group-size 128 does not divide the input size 40 of tensor 'w'"):
        _group(40, "w", s)  # no power of two >= 16 divides 40 (8 would, but MatMulNBits cannot take it)
    with pytest.raises(ValueError, match="does not divide"):
        _group(576, "w", QuantSettings(group_size=128, group_fallback=False))
