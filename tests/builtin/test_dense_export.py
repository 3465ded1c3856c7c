"""The built-in dense checkpoint (GGUF -> HF dir): config, tensors, and transformers' greedy answer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open

from moemesh.tokenization.chat_tokenizer import ChatTokenizer

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def test_config_and_generation_config(builtin_dense_dir: Path) -> None:
    config = json.loads((builtin_dense_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    expected = {"num_hidden_layers": 30, "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
                "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152, "rope_theta": 100000.0,
                "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2}
    assert {k: config[k] for k in expected} == expected
    generation = json.loads((builtin_dense_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [2, 0]  # <|im_end|>, <|endoftext|>


def test_tensors_are_float32_hf_llama(builtin_dense_dir: Path) -> None:
    with safe_open(str(builtin_dense_dir / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        total = sum(math.prod(f.get_slice(n).get_shape()) for n in names)
        assert f.get_slice("model.layers.0.self_attn.k_proj.weight").get_shape() == [192, 576]
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "F32"
    assert len(names) == 272 and "lm_head.weight" not in names
    assert round(total / 1e6, 1) == 134.5


def test_transformers_greedy_answers_paris(builtin_dense_dir: Path) -> None:
    from transformers import LlamaForCausalLM

    tok = ChatTokenizer.load(builtin_dense_dir)
    ids, _ = tok.encode_chat(FRANCE)
    model = LlamaForCausalLM.from_pretrained(builtin_dense_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
    new = out[0, len(ids):].tolist()
    assert tok.decode(new, skip_special_tokens=True).strip() == "The capital of France is Paris."
    assert new[-1] in tok.eos_token_ids


def test_cached_dir_is_complete(builtin_dense_dir: Path) -> None:
    files = {p.name for p in builtin_dense_dir.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "moemesh_source.json"} <= files
    assert builtin_dense_dir.name == "smollm2"
