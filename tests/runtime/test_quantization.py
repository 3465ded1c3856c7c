"""Weight-only quantization (quant.py) on the CPU: the int8/fp8 reference path of ExpertBank and the dense FFN, a
block-scaled FP8 checkpoint kept in FP8, and the `quantization` setting end to end. The fused GPU kernels are checked
against the same dequantized reference in test_gpu_quantization.py."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from moemesh.runtime.engine import Engine
from moemesh.runtime.experts import ExpertBank
from moemesh.runtime.quant import QuantLinear, QuantTensor, from_block_fp8, quantize
from moemesh.runtime.checkpoint import dequantize_fp8


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _config(tmp_path, experts=8, top_k=2, arch="qwen3_moe"):
    config = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 500,
              "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "head_dim": 32, "intermediate_size": 256, "moe_intermediate_size": 64, "num_experts": experts,
              "num_experts_per_tok": top_k, "norm_topk_prob": True, "rms_norm_eps": 1e-6,
              "max_position_embeddings": 512, "tie_word_embeddings": False, "eos_token_id": 2}
    if arch == "llama":
        config.update(architectures=["LlamaForCausalLM"], model_type="llama")
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize("scheme, bound", [("int8", 0.5), ("fp8", 2**-4)])
def test_quantize_per_channel_and_per_block_round_trip(scheme, bound):
    torch.manual_seed(0)
    w = torch.randn(3, 40, 300) * torch.logspace(-3, 1, 40)[:, None]  # rows of very different magnitude
    w[0, 5] = 0.0  # an all-zero row must not divide by zero
    for block_k in (None, 128):
        qt = quantize(w, scheme, block_k)
        groups = 1 if block_k is None else 3  # 300 columns in blocks of 128
        assert qt.q.dtype == (torch.int8 if scheme == "int8" else torch.float8_e4m3fn)
        assert qt.scale.shape == (3, 40, groups) and qt.scheme == scheme and qt.per_channel == (block_k is None)
        back = qt.dequantize(torch.float32)
        assert torch.isfinite(back).all() and (back[0, 5] == 0).all()
        step = qt.scale if block_k is None else qt.scale.repeat_interleave(128, -1)[..., :300]
        if scheme == "int8":  # rounding: at most half a step per element
            assert ((back - w).abs() <= bound * step * (1 + 1e-6) + 1e-12).all()  # float32 rounding of w / step
        else:  # e4m3: 3 mantissa bits, relative error <= 2^-4 for normal values
            normal = w.abs() > step * 2**-6
            assert ((back - w).abs()[normal] <= bound * w.abs()[normal] + 1e-12).all()
        assert qt.nbytes == w.numel() + qt.scale.numel() * 4


def test_deepseek_block_scales_keep_the_checkpoint_values():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(10, 12, generator=g) * torch.linspace(0.1, 10, 12)
    scale = torch.rand(3, 3, generator=g) + 0.01  # [ceil(10/4), ceil(12/4)]
    fp8 = (weight / 8).to(torch.float8_e4m3fn)
    qt = from_block_fp8(fp8, scale, (4, 4))
    assert qt.scale.shape == (10, 3) and qt.block_k == 4
    torch.testing.assert_close(qt.dequantize(torch.float32), dequantize_fp8(fp8, scale, (4, 4)), rtol=0, atol=0)


@pytest.mark.parametrize("scheme", ["int8", "fp8"])
@pytest.mark.parametrize("experts, top_k", [(8, 2), (4, 4)])  # sorted per-expert path; all experts selected
def test_quantized_expert_bank_equals_its_dequantized_weights(tmp_path, scheme, experts, top_k):
    path = _config(tmp_path, experts, top_k)
    quant = ExpertBank.load(path, load_format="dummy", quantization=scheme)
    full = ExpertBank.load(path, load_format="dummy")
    dequant = ExpertBank(quant.spec, quant.experts, {l: w.dequantize(torch.float32) for l, w in quant.gate_up.items()},
                         {l: w.dequantize(torch.float32) for l, w in quant.down.items()})
    assert quant.quantization == scheme and isinstance(quant.gate_up[0], QuantTensor)
    assert quant.weight_bytes < full.weight_bytes / 3.5  # 1 byte per weight + a float32 scale per row
    hidden = torch.randn(9, 128)
    weights, ids = torch.randn(9, experts).softmax(-1).topk(top_k, dim=-1)
    ids[0, -1] = -1  # an unused slot
    for layer in quant.layers:
        got = quant.forward(layer, hidden, ids, weights)
        torch.testing.assert_close(got, dequant.forward(layer, hidden, ids, weights), rtol=1e-5, atol=1e-6)
        assert _rel(got, full.forward(layer, hidden, ids, weights)) < (0.02 if scheme == "int8" else 0.08)


def test_dense_model_quantizes_its_ffn_and_reports_it(tmp_path):
    path = _config(tmp_path, arch="llama")
    full = Engine.load(path, load_format="dummy", kv_blocks=4, block_size=4)
    quant = Engine.load(path, load_format="dummy", kv_blocks=4, block_size=4, quantization="int8")
    assert quant.info.quantization == "int8" and full.info.quantization == "none"
    mlp = quant.backbone.layers[1].mlp
    assert isinstance(mlp.gate_proj, QuantLinear) and mlp.down_proj.q.dtype == torch.int8
    prompt = [[5, 9, 14, 3, 7, 21]]
    a, b = full.forward_logits(prompt)[0], quant.forward_logits(prompt)[0]
    assert 0 < _rel(b, a) < 0.02


def test_an_fp8_checkpoint_is_served_in_fp8_with_its_block_scales(tiny_hf, tmp_path):
    real, _ = tiny_hf("qwen3_moe")
    fp8_dir = tmp_path / "fp8"
    shutil.copytree(real, fp8_dir)
    state = load_file(str(fp8_dir / "model.safetensors"))
    for name in [n for n in state if ".experts." in n and n.endswith("_proj.weight")]:
        qt = quantize(state[name], "fp8", block_k=16)  # [N, K]: one scale per row and 16 columns, blocks of (1, 16)
        state[name], state[f"{name}_scale_inv"] = qt.q, qt.scale
    save_file(state, str(fp8_dir / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((fp8_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [1, 16]}
    (fp8_dir / "config.json").write_text(json.dumps(config))
    served = ExpertBank.load(fp8_dir, quantization="fp8")
    read = ExpertBank.load(fp8_dir)  # dequantized on read (float32)
    layer = served.layers[0]
    assert served.gate_up[layer].q.dtype == torch.float8_e4m3fn and served.gate_up[layer].block_k == 16
    assert any(n.endswith(".down_proj.weight_scale_inv") for n in served.read_names)
    torch.testing.assert_close(served.gate_up[layer].dequantize(torch.float32), read.gate_up[layer])
    torch.testing.assert_close(served.down[layer].dequantize(torch.float32), read.down[layer])


def test_bad_quantization_is_refused_with_its_value(tmp_path):
    path = _config(tmp_path)
    with pytest.raises(ValueError, match="quantization must be one of .*'int3'"):
        Engine.load(path, load_format="dummy", kv_blocks=4, quantization="int3")
    from moemesh.serving.config import ConfigError
    from services.router.config import RouterConfig

    with pytest.raises((ConfigError, SystemExit)):
        RouterConfig.load(["--quantization", "int3"])
    assert RouterConfig.load(["--quantization", "fp8"]).quantization == "fp8"
    assert RouterConfig.load(["--quantization", "int4"]).quantization == "int4"
