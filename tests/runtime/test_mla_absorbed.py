"""MLA decode with weight absorption (mla_absorbed.py) computes what the expanded path computes: the paged latent
attention against SDPA over expanded K/V, and whole engines (tiny DeepSeek V2 and V3) decoding through the paged
decode runner on the CPU against today's gather + expand path: same greedy tokens, logits within 1e-4 (float32)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moemesh.runtime.engine import Engine
from moemesh.runtime.kv_cache import KVCache
from moemesh.runtime.mla_absorbed import (absorb_query, absorbed_weights, expand_output,
                                          paged_latent_attention_ref)
from moemesh.runtime.types import SamplingParams, SequenceWork

BLOCK, BLOCKS = 4, 24


def _paged_context(lens: list[int], width: int, slots: int, seed: int = 0):
    """Block tables [B, width] int32 over distinct shuffled blocks of a pool of `slots` slots, seq_lens [B]."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(slots // BLOCK, generator=g)
    tables = perm[: len(lens) * width].view(len(lens), width).to(torch.int32)
    return tables, torch.tensor(lens, dtype=torch.int32)


def test_absorbed_attention_matches_expanded_sdpa():
    heads, nope, rdim, vdim, rank, width = 3, 8, 4, 6, 10, 5
    g = torch.Generator().manual_seed(1)
    latent_pool, rope_pool = torch.randn(64 * BLOCK, rank, generator=g), torch.randn(64 * BLOCK, rdim, generator=g)
    kv_b = torch.randn(heads * (nope + vdim), rank, generator=g)
    lens = [1, 7, 20]
    tables, seq_lens = _paged_context(lens, width, 64 * BLOCK)
    q_nope, q_rot = torch.randn(3, heads, nope, generator=g), torch.randn(3, heads, rdim, generator=g)
    w_uk, w_uv = absorbed_weights(kv_b, heads, nope, vdim)
    o_lat = paged_latent_attention_ref(absorb_query(q_nope, w_uk), q_rot, latent_pool, rope_pool, tables, seq_lens,
                                       0.3, BLOCK)
    got = expand_output(o_lat, w_uv).view(3, heads, vdim)
    for b, n in enumerate(lens):  # the expanded path: per-head K/V of the whole context, then SDPA
        slots = torch.tensor([int(tables[b, j // BLOCK]) * BLOCK + j % BLOCK for j in range(n)])
        kv = F.linear(latent_pool[slots], kv_b).view(n, heads, nope + vdim)
        k = torch.cat((kv[..., :nope], rope_pool[slots][:, None, :].expand(n, heads, rdim)), -1)  # [n, Hq, nope+r]
        q = torch.cat((q_nope[b], q_rot[b]), -1)[:, None, :]  # [Hq, 1, nope + r]
        want = F.scaled_dot_product_attention(q, k.transpose(0, 1), kv[..., nope:].transpose(0, 1), scale=0.3)
        torch.testing.assert_close(got[b], want[:, 0], atol=1e-5, rtol=1e-5)


def _engines(path):
    """(today's engine, the same weights decoding through the paged runner eagerly on the CPU)."""
    from moemesh.runtime.gpu.decode_graphs import DecodeRunner  # imports triton; nothing runs on a GPU here

    plain = Engine.load(path, kv_blocks=BLOCKS, block_size=BLOCK)
    paged = Engine.load(path, kv_blocks=BLOCKS, block_size=BLOCK)
    # One extra block, as Engine.load gives a paged engine: the runner writes padding rows there.
    paged.cache = KVCache(paged.spec.num_layers, BLOCKS + 1, BLOCK, paged.cache.shapes, "cpu", paged.dtype)
    paged.decode = DecodeRunner(paged.backbone, paged.dispatch, paged.cache.pools, BLOCK, BLOCKS, trash_block=BLOCKS,
                                device=torch.device("cpu"), graphs=False)
    return plain, paged


@pytest.mark.parametrize("arch", ["deepseek_v2", "deepseek_v3"])  # q_lora + group-limited / yarn, no q_lora
def test_absorbed_decode_matches_expanded_engine(tiny_hf, arch):
    path, _ = tiny_hf(arch)
    plain, paged = _engines(path)
    g = torch.Generator().manual_seed(5)
    prompts = {s: torch.randint(3, 256, (n,), generator=g).tolist() for s, n in (("p", 3), ("q", 11), ("r", 6))}
    works = [SequenceWork(s, p, 0, SamplingParams(temperature=0.0)) for s, p in prompts.items()]
    generated: dict[str, list[int]] = {s: [] for s in prompts}
    for step in range(8):  # crosses block boundaries (blocks of 4 tokens)
        (want, want_logits), (got, got_logits) = plain.step_with_logits(works), paged.step_with_logits(works)
        assert [r.token_id for r in got] == [r.token_id for r in want], f"step {step}"
        torch.testing.assert_close(got_logits, want_logits, atol=1e-4, rtol=0, msg=f"step {step}")
        for r in want:
            generated[r.seq_id].append(r.token_id)
        works = [SequenceWork(s, [generated[s][-1]], len(prompts[s]) + len(generated[s]) - 1) for s in prompts]
    assert paged.decode.takes(works) and len(generated["q"]) == 8
