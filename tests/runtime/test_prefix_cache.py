"""Prefix cache: a hit gives the logits a full computation gives (every architecture, MLA included), salts isolate
tenants, idle blocks are evicted least recently used under KV pressure, and preempted sequences keep shared blocks."""

from __future__ import annotations

import pytest
import torch

from hf_tiny import ARCHS
from moemesh.runtime.block_manager import BlockManager
from moemesh.runtime.engine import Engine
from moemesh.runtime.types import CapacityError, SequenceWork

PREFIX = [5, 9, 2, 7, 1, 3, 8, 4, 6, 2, 9, 5]  # 3 blocks of 4


def _prefill(engine: Engine, seq_id: str, tokens: list[int], salt: str = "t1"):
    (result,), logits = engine.step_with_logits([SequenceWork(seq_id, tokens, 0, salt=salt)])
    return result, logits[0]


@pytest.mark.parametrize("arch", ARCHS)
def test_hit_gives_the_logits_of_a_full_computation(tiny_hf, arch):
    path, _ = tiny_hf(arch)
    cached = Engine.load(path, kv_blocks=16, block_size=4)
    plain = Engine.load(path, kv_blocks=16, block_size=4, prefix_cache=False)
    _prefill(cached, "warm", PREFIX + [11, 12])
    for engine, expect_hit in ((cached, 12), (plain, 0)):
        result, logits = _prefill(engine, "b", PREFIX + [13, 14, 15])
        assert result.cached_tokens == expect_hit
        if expect_hit:
            hit_logits, hit_token = logits, result.token_id
    assert result.token_id == hit_token
    torch.testing.assert_close(hit_logits, logits, atol=1e-4, rtol=1e-4)
    # decoding on top of the shared blocks stays identical too
    steps = [e.step([SequenceWork("b", [hit_token], 15, sampling=None)])[0].token_id for e in (cached, plain)]
    assert steps[0] == steps[1]


def test_other_tenant_never_hits(tiny_hf):
    engine = Engine.load(tiny_hf("llama")[0], kv_blocks=16, block_size=4)
    _prefill(engine, "a", PREFIX + [1], salt="tenant-a")
    assert _prefill(engine, "b", PREFIX + [1], salt="tenant-b")[0].cached_tokens == 0
    assert _prefill(engine, "a2", PREFIX + [1], salt="tenant-a")[0].cached_tokens == 12
    assert _prefill(engine, "a3", PREFIX + [1], salt="tenant-a\x00other-salt")[0].cached_tokens == 0


def test_whole_prompt_hit_recomputes_the_last_token(tiny_hf):
    engine = Engine.load(tiny_hf("llama")[0], kv_blocks=16, block_size=4)
    first, logits = _prefill(engine, "a", PREFIX)
    again, logits2 = _prefill(engine, "b", PREFIX)
    assert again.cached_tokens == 8 and again.token_id == first.token_id  # the last block holds the sampled token
    torch.testing.assert_close(logits, logits2, atol=1e-4, rtol=1e-4)
    # a chunk that does not sample may be served entirely from the cache
    (chunk,) = engine.step([SequenceWork("c", PREFIX[:8], 0, sample=False, salt="t1")])
    assert chunk.cached_tokens == 8 and engine.cached_length("c") == 8


def test_idle_blocks_are_evicted_least_recently_used():
    bm = BlockManager(num_blocks=4, block_size=2)
    for seq, tokens in (("a", [1, 2]), ("b", [3, 4]), ("c", [5, 6])):
        bm.match(seq, "s", 0, tokens, 2)
        bm.reserve({seq: 2})
        bm.commit(seq, tokens)
        bm.free(seq)  # idle but cached
    assert bm.free_blocks == 4 and bm.cached_blocks == 3
    assert bm.match("a2", "s", 0, [1, 2], 2) == 2  # a's block is used again: now the most recent
    bm.free("a2")
    bm.reserve({"big": 6})  # 1 free + evicts the two least recently used (b, c)
    assert bm.index.evictions == 2 and bm.cached_blocks == 1
    assert bm.match("b2", "s", 0, [3, 4], 2) == 0 and bm.match("a3", "s", 0, [1, 2], 2) == 2
    with pytest.raises(CapacityError):
        bm.reserve({"more": 2})


def test_own_blocks_count_what_a_release_gives_back():
    bm = BlockManager(num_blocks=8, block_size=2)
    bm.match("a", "s", 0, [1, 2, 3, 4, 5], 4)
    bm.reserve({"a": 5})
    bm.commit("a", [1, 2, 3, 4, 5])
    assert bm.own("a") == 3
    assert bm.match("b", "s", 0, [1, 2, 3, 4, 9], 4) == 4
    bm.reserve({"b": 5})
    assert (bm.own("a"), bm.own("b")) == (1, 1) and bm.take_dirty() == {"a"}
    free = bm.free_blocks
    bm.free("a")
    assert bm.free_blocks == free + 1 and bm.own("b") == 3 and bm.take_dirty() == {"b"}


def test_preempted_sequence_with_shared_blocks_recomputes_identically(tiny_hf):
    path, _ = tiny_hf("deepseek_v2")  # MLA: the cached latent is what the blocks hold
    engine = Engine.load(path, kv_blocks=12, block_size=4)
    first, _ = _prefill(engine, "a", PREFIX + [1, 2])
    second, _ = _prefill(engine, "b", PREFIX + [1, 2])
    assert second.cached_tokens == 12
    last, position = second.token_id, 14
    for _ in range(3):  # b decodes on the shared blocks
        (result,) = engine.step([SequenceWork("b", [last], position, sampling=None)])
        last, position = result.token_id, position + 1
    engine.release(["b"])  # preempted: a still holds the shared prefix
    assert engine.blocks.own("a") == engine.blocks.blocks_for(14)
    again, _ = _prefill(engine, "b", PREFIX + [1, 2])
    assert again.cached_tokens == 12 and again.token_id == second.token_id


def test_later_chunks_hit_under_the_salt_of_the_first():
    """Works after position 0 name no salt (it travels once): their blocks are keyed with the sequence's own salt."""
    bm = BlockManager(num_blocks=12, block_size=2)
    bm.match("a", "s", 0, [1, 2, 3, 4], 4)
    bm.reserve({"a": 4})
    bm.commit("a", [1, 2, 3, 4])
    for seq, salt, expect in (("b", "s", 2), ("c", "other", 0)):
        assert bm.match(seq, salt, 0, [1, 2], 2) == expect
        bm.reserve({seq: 2})
        bm.commit(seq, [1, 2])
        assert bm.match(seq, "", 2, [3, 4, 5], 3) == expect  # the second chunk: hit only within the salt
