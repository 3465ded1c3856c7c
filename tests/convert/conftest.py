"""A tiny dense Llama written by transformers (LlamaConfig + save_pretrained) with SmolLM2's real tokenizer files."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=49152, max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=100000.0,
            tie_word_embeddings=True)


def write_tiny_dense(out: Path, tokenizer_from: Path | None, seed: int = 0, **overrides: object) -> Path:
    """Random tiny LlamaForCausalLM; tokenizer files copied from `tokenizer_from` (None: no tokenizer)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides}, bos_token_id=1, eos_token_id=2, pad_token_id=2))
    with torch.no_grad():  # std 0.02 everywhere makes every neuron alike; spread the FFN so routing matters
        for layer in model.model.layers:
            for proj in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                proj.weight.normal_(0, 0.2)
    model.save_pretrained(out)
    names = () if tokenizer_from is None else ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
    for name in names:
        shutil.copyfile(tokenizer_from / name, out / name)
    return out


@pytest.fixture(scope="session")
def tiny_dense_dir(tmp_path_factory: pytest.TempPathFactory, builtin_dense_dir: Path) -> Path:
    return write_tiny_dense(tmp_path_factory.mktemp("tiny_dense"), builtin_dense_dir)


@pytest.fixture(scope="session")
def tiny_dense_small_vocab(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Vocabulary 512 and no tokenizer (self-generation starts from random tokens): fast distillation tests."""
    return write_tiny_dense(tmp_path_factory.mktemp("tiny_small_vocab"), None, seed=1, vocab_size=512)
