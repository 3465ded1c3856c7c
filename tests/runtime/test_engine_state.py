"""Engine step semantics: atomic steps (capacity, bad positions, failing experts), release, info, sampling state."""

from __future__ import annotations

import pytest
import torch

from moemesh.runtime.dispatch import Dispatch
from moemesh.runtime.engine import Engine
from moemesh.runtime.types import (
    CapacityError, ContextLengthError, SamplingParams, SequenceStateError, SequenceWork,
)

PROMPT = list(range(3, 13))  # 10 tokens


@pytest.fixture
def engine(tiny_hf) -> Engine:
    path, _ = tiny_hf("mixtral")
    return Engine.load(path, kv_blocks=4, block_size=4)  # 16 token slots


def _snapshot(engine: Engine) -> tuple:
    info = engine.info
    return info.kv_blocks_free, info.active_sequences, engine.cached_length("a"), engine.cached_length("b")


def test_capacity_error_leaves_the_engine_unchanged(engine):
    engine.step([SequenceWork("a", PROMPT, 0)])  # 3 blocks
    before = _snapshot(engine)
    with pytest.raises(CapacityError):
        engine.step([SequenceWork("a", [5], 10), SequenceWork("b", list(range(20, 28)), 0)])  # b needs 2 blocks, 1 free
    assert _snapshot(engine) == before == (1, 1, 10, None)
    # a's cache is intact: its next step gives the logits of a fresh full forward
    _, logits = engine.step_with_logits([SequenceWork("a", [5], 10)])
    expected = engine.forward_logits([PROMPT + [5]])[0][-1]
    torch.testing.assert_close(logits[0], expected, atol=1e-5, rtol=0)


def test_failed_forward_rolls_the_step_back(engine):
    engine.step([SequenceWork("a", PROMPT[:4], 0)])
    before = _snapshot(engine)
    real = engine.dispatch

    class ShardDown(Dispatch):
        def submit(self, *args):
            raise RuntimeError("expert shard unavailable")

    engine.dispatch = ShardDown()
    with pytest.raises(RuntimeError, match="unavailable"):
        engine.step([SequenceWork("a", PROMPT[4:], 4), SequenceWork("b", [7, 8], 0)])
    assert _snapshot(engine) == before
    engine.dispatch = real
    _, logits = engine.step_with_logits([SequenceWork("a", PROMPT[4:], 4)])
    torch.testing.assert_close(logits[0], engine.forward_logits([PROMPT])[0][-1], atol=1e-5, rtol=0)


def test_positions_must_match_the_cache(engine):
    engine.step([SequenceWork("a", PROMPT[:3], 0)])
    with pytest.raises(SequenceStateError, match="'a': position 2 but it has 3 tokens cached"):
        engine.step([SequenceWork("a", [4], 2)])
    with pytest.raises(SequenceStateError, match="'a': position 0 but it has 3 tokens cached"):
        engine.step([SequenceWork("a", [4], 0)])
    with pytest.raises(SequenceStateError, match="'zz': position 5 but it is unknown"):
        engine.step([SequenceWork("zz", [4], 5)])
    with pytest.raises(ValueError, match="at most once"):
        engine.step([SequenceWork("b", [4], 0), SequenceWork("b", [5], 0)])
    with pytest.raises(ValueError, match="token_ids is empty"):
        engine.step([SequenceWork("b", [], 0)])
    with pytest.raises(ValueError, match=r"token ids \[256\] outside \[0, 256\)"):
        engine.step([SequenceWork("b", [256], 0)])
    assert _snapshot(engine) == (3, 1, 3, None)


def test_max_context_is_enforced(tiny_hf):
    path, _ = tiny_hf("mixtral")
    engine = Engine.load(path, kv_blocks=8, block_size=4, max_context=12)
    assert engine.info.max_context == 12
    with pytest.raises(ContextLengthError, match="13 tokens exceed max_context 12"):
        engine.step([SequenceWork("a", list(range(3, 16)), 0)])
    assert Engine.load(path, kv_blocks=2, block_size=4).info.max_context == 8  # capped by the cache
    with pytest.raises(ValueError, match="max_context must be in"):
        Engine.load(path, kv_blocks=2, max_context=10**6)


def test_release_and_info(engine):
    engine.step([SequenceWork("a", PROMPT, 0), SequenceWork("b", [3], 0)])
    info = engine.info
    assert (info.architecture, info.num_experts, info.experts_per_token) == ("MixtralForCausalLM", 4, 2)
    assert info.moe_layers == (0, 1) and info.eos_token_ids == (2,) and info.dtype == "float32"
    assert (info.kv_blocks_total, info.kv_blocks_free, info.active_sequences) == (4, 0, 2)
    assert engine.release(["a", "unknown"]) == 1
    assert engine.info.kv_blocks_free == 3 and engine.info.active_sequences == 1
    engine.step([SequenceWork("a", [3], 0)])  # a released id starts afresh


def test_same_seed_same_tokens_and_penalties_see_the_completion(engine):
    seeded = SamplingParams(temperature=1.0, seed=1234)
    works = [SequenceWork("a", PROMPT[:3], 0, seeded), SequenceWork("b", PROMPT[:3], 0, seeded)]
    for _ in range(5):
        ra, rb = engine.step(works)
        assert ra.token_id == rb.token_id
        works = [SequenceWork(w.seq_id, [ra.token_id], engine.cached_length(w.seq_id), seeded) for w in works]
    engine.release(["a", "b"])
    penalised, counts = SamplingParams(frequency_penalty=2.0), torch.zeros(256)
    work = SequenceWork("a", PROMPT[:2], 0, penalised)
    for _ in range(6):  # greedy over raw logits minus 2 x completion counts: the engine keeps the counts
        (result,), logits = engine.step_with_logits([work])
        assert result.token_id == int((logits[0] - 2.0 * counts).argmax())
        counts[result.token_id] += 1
        work = SequenceWork("a", [result.token_id], engine.cached_length("a"), penalised)


def test_logprobs_and_bfloat16(tiny_hf):
    path, _ = tiny_hf("qwen3_moe")
    engine = Engine.load(path, dtype="bfloat16", kv_blocks=4)
    assert engine.info.dtype == "bfloat16"
    params = SamplingParams(logprobs=True, top_logprobs=3)
    (result,), logits = engine.step_with_logits([SequenceWork("a", PROMPT, 0, params)])
    assert torch.isfinite(logits).all() and result.token_id == int(logits[0].argmax())
    assert result.logprob == pytest.approx(float(torch.log_softmax(logits[0], -1).max()), abs=1e-4)
    assert [t for t, _ in result.top_logprobs][0] == result.token_id and len(result.top_logprobs) == 3


def test_capacity_from_a_memory_budget(tiny_hf):
    path, _ = tiny_hf("mixtral")  # 2 layers x (K + V) x 2 kv heads x 16 dims x 4 bytes = 512 B per token
    engine = Engine.load(path, kv_memory_bytes=20 * 1024, block_size=4)  # 2 KiB blocks
    assert engine.info.kv_blocks_total == 10 and engine.cache.nbytes == 20 * 1024
    assert engine.info.max_context == 40
    mla_path, _ = tiny_hf("deepseek_v3")  # MLA caches the latent: 2 layers x (16 latent + 8 rope) x 4 B = 192 B/token
    mla = Engine.load(mla_path, kv_memory_bytes=5 * 4 * 192, block_size=4)
    assert mla.info.kv_blocks_total == 5 and mla.cache.shapes == ((16,), (8,))
