"""MLA decode on CUDA (gpu/mla_decode.py): the Triton paged latent attention against the torch reference at
DeepSeek-V2-Lite's head shape, and a tiny DeepSeek engine decoding in CUDA graphs against the expanded path.
Needs CUDA and Triton: run on the H200 (on the CPU, TRITON_INTERPRET=1 runs the kernel for debugging)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moemesh.runtime.engine import Engine
from moemesh.runtime.gpu import kernels_usable
from moemesh.runtime.mla_absorbed import paged_latent_attention_ref
from test_gpu_kernels import _decode_logits, _rel

WHY = kernels_usable(torch.device("cuda"), torch.bfloat16)
cuda = pytest.mark.skipif(bool(WHY), reason=f"needs CUDA with Triton: {WHY}")
BF16 = torch.bfloat16


@cuda
@pytest.mark.parametrize("splits", [None, 1])  # None: the launch picks (flash-decoding), 1: one program walks all
def test_mla_decode_kernel_matches_reference(splits):
    from moemesh.runtime.gpu.mla_decode import mla_decode_attention

    heads, rank, rope, bs, width = 16, 512, 64, 16, 80  # DeepSeek-V2-Lite's attention, 1280 tokens of reach
    lens = [1, 17, 300, 1280]
    pool_l = torch.randn(512 * bs, rank, device="cuda", dtype=BF16)
    pool_r = torch.randn(512 * bs, rope, device="cuda", dtype=BF16)
    tables = torch.randperm(512, device="cuda")[: len(lens) * width].view(len(lens), width).to(torch.int32)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    q_lat = torch.randn(heads, len(lens), rank, device="cuda", dtype=BF16).transpose(0, 1)  # absorb_query's layout
    q_rot = torch.randn(len(lens), heads, rope, device="cuda", dtype=BF16)
    got = mla_decode_attention(q_lat, q_rot, pool_l, pool_r, tables, seq_lens, 0.05, bs, splits=splits)
    want = paged_latent_attention_ref(q_lat, q_rot, pool_l, pool_r, tables, seq_lens, 0.05, bs)
    for b in range(len(lens)):
        assert _rel(got[b], want[b]) < 1e-2, (b, _rel(got[b], want[b]))


INTERPRETED = """
import torch
from moemesh.runtime.gpu.mla_decode import mla_decode_attention
from moemesh.runtime.mla_absorbed import paged_latent_attention_ref
torch.manual_seed(0)
heads, rank, rope, bs, width, lens = 20, 32, 8, 4, 20, [1, 7, 65]  # 2 head blocks, rope dim padded to 16
pool_l, pool_r = torch.randn(128 * bs, rank), torch.randn(128 * bs, rope)
tables = torch.randperm(128)[: len(lens) * width].view(len(lens), width).to(torch.int32)
seq_lens = torch.tensor(lens, dtype=torch.int32)
q_lat, q_rot = torch.randn(heads, len(lens), rank).transpose(0, 1), torch.randn(len(lens), heads, rope)
want = paged_latent_attention_ref(q_lat, q_rot, pool_l, pool_r, tables, seq_lens, 0.2, bs)
for splits in (1, 8):  # 8: some splits of the short sequences are empty
    got = mla_decode_attention(q_lat, q_rot, pool_l, pool_r, tables, seq_lens, 0.2, bs, splits=splits)
    print(splits, (got - want).abs().max().item())
    assert (got - want).abs().max().item() < 1e-4, splits
"""


@pytest.mark.slow  # ~20 s idle (a subprocess importing torch and triton), a minute on the busy 2-core machine
@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU check: on a GPU the compiled kernel is tested above "
                    "(the interpreter of the GPU image's Triton 3.6 differs from the CPU venv's 3.9)")
def test_mla_decode_kernel_under_the_triton_interpreter():
    """The kernels' logic (split context, empty splits, merge, padded heads and rope dims) on the CPU, float32: the
    interpreter runs Triton programs with numpy (its bfloat16 is not faithful; the CUDA tests cover bf16)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    run = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]


def _deepseek_config(tmp_path):
    config = {"architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "vocab_size": 1000,
              "hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 8,
              "kv_lora_rank": 128, "q_lora_rank": None, "qk_nope_head_dim": 64, "qk_rope_head_dim": 32,
              "v_head_dim": 64, "intermediate_size": 512, "moe_intermediate_size": 128, "n_routed_experts": 16,
              "num_experts_per_tok": 4, "n_shared_experts": 2, "first_k_dense_replace": 1, "topk_method": "greedy",
              "routed_scaling_factor": 1.0, "norm_topk_prob": False, "rms_norm_eps": 1e-6,
              "max_position_embeddings": 4096, "tie_word_embeddings": False, "eos_token_id": 2}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


@cuda
@pytest.mark.parametrize("batch", [1, 5])  # 5: padded to the bucket of 8
def test_deepseek_decode_graphs_match_the_expanded_path(tmp_path, batch):
    path = _deepseek_config(tmp_path)
    kw = dict(load_format="dummy", device="cuda", dtype=BF16, kv_blocks=64, block_size=16)
    graphs, reference = Engine.load(path, **kw), Engine.load(path, **kw)
    reference.decode = None  # gathered latent context, expanded through kv_b_proj, SDPA
    assert graphs.info.cuda_graphs.startswith("on"), graphs.info.cuda_graphs
    prompts = [[3 + i] * (5 + 9 * i) for i in range(batch)]
    want = _decode_logits(reference, prompts, 20)  # crosses a KV block boundary
    got = _decode_logits(graphs, prompts, 20)
    assert all(_rel(g, w) < 3e-2 for g, w in zip(got, want)), [_rel(g, w) for g, w in zip(got, want)]
    # the prompts' prefill, one row per token (5 -> bucket 8; 115 -> 128), then the decode steps' bucket
    assert sorted(graphs.decode.graphs) == ([1, 8] if batch == 1 else [8, 128])
