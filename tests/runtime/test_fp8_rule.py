"""quant.py's fp8 rule for dense FFNs: every layer's projections get FP8_BLOCK_K-column block scales; int8 keeps one
scale per output channel."""

from __future__ import annotations

import json

import torch

from moemesh.runtime.engine import Engine
from moemesh.runtime.quant import FP8_BLOCK_K, QuantLinear, quantize


def _llama(tmp_path):
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 300, "hidden_size": 256,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "intermediate_size": 384, "rms_norm_eps": 1e-5, "max_position_embeddings": 256,
              "tie_word_embeddings": False, "eos_token_id": 2}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_fp8_block_scales_every_dense_ffn(tmp_path):
    path = _llama(tmp_path)
    full = Engine.load(path, load_format="dummy", kv_blocks=4, block_size=4)
    fp8 = Engine.load(path, load_format="dummy", kv_blocks=4, block_size=4, quantization="fp8")
    for i, layer in enumerate(fp8.backbone.layers):
        mlp, weight = layer.mlp, full.backbone.layers[i].mlp.down_proj.weight  # down: [256, 384]
        assert isinstance(mlp.down_proj, QuantLinear) and mlp.down_proj.q.dtype == torch.float8_e4m3fn
        assert mlp.gate_proj.block_k == FP8_BLOCK_K and mlp.gate_proj.scale.shape == (384, 2)  # K 256
        assert mlp.down_proj.scale.shape == (256, 3)  # K 384: three blocks of 128
        block = mlp.down_proj.scale[:, 1:2]  # columns 128..255 of every row use their own block's max
        torch.testing.assert_close(block, weight[:, 128:256].abs().amax(1, keepdim=True) / 448)
        torch.testing.assert_close(mlp.down_proj(torch.eye(384)).T,
                                   quantize(weight, "fp8", FP8_BLOCK_K).dequantize(torch.float32))
    prompt = [[5, 9, 14, 3, 7, 21]]
    a, b = full.forward_logits(prompt)[0], fp8.forward_logits(prompt)[0]
    assert 0 < ((b - a).norm() / a.norm()).item() < 0.05


def test_int8_quantizes_every_layer_per_channel(tmp_path):
    int8 = Engine.load(_llama(tmp_path), load_format="dummy", kv_blocks=4, block_size=4, quantization="int8")
    for layer in int8.backbone.layers:
        assert isinstance(layer.mlp.up_proj, QuantLinear) and layer.mlp.up_proj.scale.shape == (384, 1)
