"""quant.py's fp8 rule for dense FFNs: the first FP8_DENSE_KEEP_FIRST layers stay in the compute dtype, the others
get FP8_BLOCK_K-column block scales; int8 keeps one scale per channel on every layer."""

from __future__ import annotations

import json

import torch

from moemesh.runtime.engine import Engine
from moemesh.runtime.layers import Linear
from moemesh.runtime.quant import FP8_BLOCK_K, FP8_DENSE_KEEP_FIRST, QuantLinear

LAYERS = FP8_DENSE_KEEP_FIRST + 2


def _llama(tmp_path):
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 300, "hidden_size": 256,
              "num_hidden_layers": LAYERS, "num_attention_heads": 4, "num_key_value_heads": 2,
              "intermediate_size": 384, "rms_norm_eps": 1e-5, "max_position_embeddings": 256,
              "tie_word_embeddings": False, "eos_token_id": 2}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_fp8_keeps_the_first_layers_and_block_scales_the_rest(tmp_path):
    path = _llama(tmp_path)
    full = Engine.load(path, load_format="dummy", kv_blocks=4, block_size=4)
    fp8 = Engine.load(path, load_format="dummy", kv_blocks=4, block_size=4, quantization="fp8")
    for i, layer in enumerate(fp8.backbone.layers):
        mlp = layer.mlp
        if i < FP8_DENSE_KEEP_FIRST:
            assert type(mlp.gate_proj) is Linear and type(mlp.down_proj) is Linear, i
            torch.testing.assert_close(mlp.down_proj.weight, full.backbone.layers[i].mlp.down_proj.weight)
            continue
        assert isinstance(mlp.down_proj, QuantLinear) and mlp.down_proj.q.dtype == torch.float8_e4m3fn
        assert mlp.gate_proj.block_k == FP8_BLOCK_K and mlp.gate_proj.scale.shape == (384, 2)  # K 256
        assert mlp.down_proj.scale.shape == (256, 3)  # K 384: three blocks of 128
    prompt = [[5, 9, 14, 3, 7, 21]]
    a, b = full.forward_logits(prompt)[0], fp8.forward_logits(prompt)[0]
    assert 0 < ((b - a).norm() / a.norm()).item() < 0.05


def test_int8_quantizes_every_layer_per_channel(tmp_path):
    int8 = Engine.load(_llama(tmp_path), load_format="dummy", kv_blocks=4, block_size=4, quantization="int8")
    for layer in int8.backbone.layers:
        assert isinstance(layer.mlp.up_proj, QuantLinear) and layer.mlp.up_proj.scale.shape == (384, 1)
