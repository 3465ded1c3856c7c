"""Checkpoint reading: sharded checkpoints (index.json), block-scaled FP8 weights, model references."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import hf_tiny
from moemesh.runtime.checkpoint import Checkpoint, resolve_model_dir
from moemesh.runtime.engine import Engine
from moemesh.runtime.experts import ExpertBank


def test_sharded_checkpoint_loads_through_its_index(tiny_hf, tmp_path):
    _, ref = tiny_hf("qwen2_moe")
    ref.save_pretrained(tmp_path, max_shard_size="60KB")
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(files) > 2 and (tmp_path / "model.safetensors.index.json").is_file()
    bank = ExpertBank.load(tmp_path, experts=[1])
    assert bank.read_names and all(".experts.1." in n for n in bank.read_names)
    prompt = list(range(5, 17))
    logits = Engine.load(tmp_path, kv_blocks=4).forward_logits([prompt])[0]
    torch.testing.assert_close(logits, hf_tiny.reference_logits(ref, prompt), atol=1e-4, rtol=0)


def test_block_scaled_fp8_weights_are_dequantized(tmp_path):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(10, 12, generator=g) * torch.linspace(0.1, 10, 12)  # columns of very different scale
    block = (4, 4)
    scale = torch.zeros(3, 3)
    for i in range(3):
        for j in range(3):
            tile = weight[i * 4:(i + 1) * 4, j * 4:(j + 1) * 4]
            scale[i, j] = tile.abs().max() / 448.0  # e4m3 max
    expanded = scale.repeat_interleave(4, 0)[:10].repeat_interleave(4, 1)[:, :12]
    quantized = (weight / expanded).to(torch.float8_e4m3fn)
    save_file({"w.weight": quantized, "w.weight_scale_inv": scale}, str(tmp_path / "model.safetensors"))
    quantization = {"quant_method": "fp8", "weight_block_size": list(block)}
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": quantization}))
    ckpt = Checkpoint(tmp_path)
    restored = ckpt.read("w.weight", dtype=torch.float32)
    assert restored.dtype == torch.float32 and ckpt.reads == ["w.weight", "w.weight_scale_inv"]
    torch.testing.assert_close(restored, weight, rtol=0.07, atol=1e-6)  # e4m3 keeps 3 mantissa bits


def test_model_reference_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown model .*missing"):
        resolve_model_dir(tmp_path / "missing")
    with pytest.raises(ValueError, match="unknown model 'a/b/c'"):
        resolve_model_dir("a/b/c")
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model_dir(tmp_path) == tmp_path.resolve()
    with pytest.raises(Exception, match="no \\*.safetensors weights"):
        Checkpoint(tmp_path)
