"""The tiny test checkpoint: agreed MoE layout, determinism, real tokenizer, loadable dense variant."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from moemesh.builtin.tiny import DENSE_ARCH, make_tiny_model


def test_moe_layout_and_config(tiny_moe_dir: Path) -> None:
    config = json.loads((tiny_moe_dir / "config.json").read_text())
    assert config["architectures"] == ["MoemeshLlamaMoeForCausalLM"]
    assert (config["num_local_experts"], config["num_experts_per_tok"], config["moe_intermediate_size"]) == (4, 2, 32)
    assert config["shared_expert_intermediate_size"] == 0 and config["router_weighting"] == "softmax"
    w = load_file(str(tiny_moe_dir / "model.safetensors"))
    assert w["model.layers.1.mlp.gate.weight"].shape == (4, 64)  # [E, H]
    assert w["model.layers.0.mlp.experts.3.gate_proj.weight"].shape == (32, 64)
    assert w["model.layers.0.mlp.experts.3.down_proj.weight"].shape == (64, 32)
    assert w["model.layers.0.self_attn.k_proj.weight"].shape == (32, 64)  # 2 KV heads x 16
    assert not any("shared_expert" in n or "mlp.gate_proj" in n for n in w)
    assert all(a.dtype == np.float32 for a in w.values())


def test_runtime_spec_accepts_it(tiny_moe_dir: Path) -> None:
    from moemesh.runtime.families import spec_from_config

    config = json.loads((tiny_moe_dir / "config.json").read_text())
    generation = json.loads((tiny_moe_dir / "generation_config.json").read_text())
    spec = spec_from_config(config, generation)
    assert spec.moe.num_experts == 4 and spec.moe.top_k == 2 and spec.eos_token_ids == (2, 0)


def test_shared_expert_and_determinism(tmp_path: Path, tiny_moe_dir: Path) -> None:
    a = make_tiny_model(tmp_path / "a", shared_expert_intermediate=16, tokenizer_from=tiny_moe_dir)
    b = make_tiny_model(tmp_path / "b", shared_expert_intermediate=16, tokenizer_from=tiny_moe_dir)
    c = make_tiny_model(tmp_path / "c", shared_expert_intermediate=16, seed=1, tokenizer_from=tiny_moe_dir)
    wa, wb, wc = (load_file(str(d / "model.safetensors")) for d in (a, b, c))
    assert wa["model.layers.0.mlp.shared_expert.up_proj.weight"].shape == (16, 64)
    assert all(np.array_equal(wa[n], wb[n]) for n in wa)
    assert not np.array_equal(wa["model.embed_tokens.weight"], wc["model.embed_tokens.weight"])


def test_tokenizer_built_from_the_gguf_equals_the_builtin_one(tmp_path: Path, builtin_dense_dir: Path) -> None:
    make_tiny_model(tmp_path, layers=1)  # no tokenizer_from: builds the files from the GGUF
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (builtin_dense_dir / name).read_bytes()


def test_dense_variant_loads_in_transformers(tmp_path: Path, tiny_moe_dir: Path) -> None:
    from transformers import LlamaForCausalLM

    path = make_tiny_model(tmp_path, arch=DENSE_ARCH, tokenizer_from=tiny_moe_dir)
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
    logits = model(torch.tensor([[1, 520, 9531, 198]])).logits
    assert logits.shape == (1, 4, 49152) and torch.isfinite(logits).all()


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"arch": "MixtralForCausalLM"}, "arch must be"),
    ({"top_k": 5}, "top_k"),
    ({"router_weighting": "sigmoid"}, "router_weighting"),
    ({"hidden": 60}, "head_dim"),
])
def test_bad_arguments(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_tiny_model(tmp_path, **kwargs)
