"""GGUF reading: Q/K un-permutation, tensor naming, metadata of the built-in SmolLM2 GGUF."""

from __future__ import annotations

import numpy as np
import pytest

from moemesh.builtin.gguf_reader import GgufLlama, hf_tensor_name, permute_rope, unpermute_rope
from moemesh.builtin.gguf_source import builtin_gguf_path


def test_unpermute_turns_interleaved_pairs_into_halves() -> None:
    # One head of head_dim 4: llama.cpp stores rows (a0, b0, a1, b1); rotate-half wants (a0, a1, b0, b1).
    stored = np.array([[10.0], [20.0], [11.0], [21.0]])
    assert unpermute_rope(stored, n_head=1)[:, 0].tolist() == [10.0, 11.0, 20.0, 21.0]


def test_unpermute_inverts_llama_cpp_permute_per_head() -> None:
    w = np.random.default_rng(0).standard_normal((3 * 64, 576)).astype(np.float32)
    assert np.array_equal(unpermute_rope(permute_rope(w, 3), 3), w)
    assert not np.array_equal(permute_rope(w, 3), w)
    with pytest.raises(ValueError, match="heads"):
        unpermute_rope(np.zeros((6, 2)), n_head=4)


def test_tensor_names() -> None:
    assert hf_tensor_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_tensor_name("blk.29.ffn_down.weight") == "model.layers.29.mlp.down_proj.weight"
    assert hf_tensor_name("blk.0.attn_k.weight") == "model.layers.0.self_attn.k_proj.weight"
    with pytest.raises(ValueError, match="blk.0.attn_qkv.weight"):
        hf_tensor_name("blk.0.attn_qkv.weight")


def test_builtin_gguf_metadata_matches_the_measured_facts() -> None:
    gguf = GgufLlama.open(builtin_gguf_path())
    assert gguf.arch("block_count") == 30 and gguf.arch("embedding_length") == 576
    assert (gguf.arch("attention.head_count"), gguf.arch("attention.head_count_kv")) == (9, 3)
    assert gguf.arch("rope.freq_base") == 100000.0 and gguf.arch("attention.layer_norm_rms_epsilon") == 1e-5
    assert "output.weight" not in gguf.tensor_names()  # tied embeddings
    with pytest.raises(KeyError, match="llama.no_such_key"):
        gguf.arch("no_such_key")
