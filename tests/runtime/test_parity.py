"""The runtime computes the same function as transformers for every supported architecture (float32, 1e-4):
full-sequence logits, ragged engine steps through the paged KV cache (chunked prefill mixed with decodes), the
experts split over two in-process shards, and 32 greedy tokens."""

from __future__ import annotations

import pytest
import torch

import hf_tiny
from hf_tiny import DEVICE
from moemesh.runtime.dispatch import SumDispatch
from moemesh.runtime.engine import Engine
from moemesh.runtime.experts import ExpertBank, shard_experts
from moemesh.runtime.spec import load_spec
from moemesh.runtime.types import SamplingParams, SequenceWork

TOL = 1e-4
MOE_ARCHS = [a for a in hf_tiny.ARCHS if a != "llama"]


def _tokens(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, hf_tiny.VOCAB, (n,), generator=g).tolist()


def _two_shards(path) -> SumDispatch:
    n = load_spec(path).num_experts
    return SumDispatch([ExpertBank.load(path, experts=shard_experts(n, 2, i), device=DEVICE) for i in range(2)])


def _engine(path, sharded: bool = False, kv_blocks: int = 24) -> Engine:
    dispatch = _two_shards(path) if sharded else None
    return Engine.load(path, dispatch=dispatch, device=DEVICE, kv_blocks=kv_blocks, block_size=4)


@pytest.mark.parametrize("arch", hf_tiny.ARCHS)
def test_forward_logits_match_transformers(tiny_hf, arch):
    path, ref = tiny_hf(arch)
    engine = _engine(path, kv_blocks=4)
    prompts = [_tokens(n, seed=n) for n in (1, 7, 30)]  # one unequal-length batch
    for prompt, logits in zip(prompts, engine.forward_logits(prompts)):
        expected = hf_tiny.reference_logits(ref, prompt)
        torch.testing.assert_close(logits.cpu(), expected, atol=TOL, rtol=0)


# Each step lists (seq, start, end, sample): seq's tokens [start, end) are fed; prefill chunks, whole prompts and
# decode tokens share steps. Sequences: a 21 tokens (3 chunks), b 8 (prompt 6 + 2 decodes), c 3, d 13.
SCHEDULE = [
    [("a", 0, 8, False), ("b", 0, 6, True), ("c", 0, 1, True)],
    [("a", 8, 16, False), ("b", 6, 7, True), ("c", 1, 2, True), ("d", 0, 12, True)],
    [("a", 16, 21, True), ("b", 7, 8, True), ("c", 2, 3, True), ("d", 12, 13, True)],
]
LENGTHS = {"a": 21, "b": 8, "c": 3, "d": 13}


# A dense model has no experts to shard: llama runs only locally.
CASES = [(arch, sharded) for arch in hf_tiny.ARCHS for sharded in (False, True) if not (sharded and arch == "llama")]


@pytest.mark.parametrize(("arch", "sharded"), CASES, ids=[f"{a}-{'two_shards' if s else 'local'}" for a, s in CASES])
def test_ragged_steps_through_kv_cache_match_transformers(tiny_hf, arch, sharded):
    path, ref = tiny_hf(arch)
    engine = _engine(path, sharded)
    seqs = {s: _tokens(n, seed=100 + i) for i, (s, n) in enumerate(LENGTHS.items())}
    expected = {s: hf_tiny.reference_logits(ref, toks) for s, toks in seqs.items()}
    for step in SCHEDULE:
        works = [SequenceWork(s, seqs[s][a:b], a, sample=sample) for s, a, b, sample in step]
        results, logits = engine.step_with_logits(works)
        rows = [(s, b) for s, a, b, sample in step if sample]
        assert len(rows) == logits.shape[0]
        for (s, end), row in zip(rows, logits):
            torch.testing.assert_close(row.cpu(), expected[s][end - 1], atol=TOL, rtol=0, msg=f"{s} at {end - 1}")
        for r, (s, a, b, sample) in zip(results, step):
            assert r.seq_id == s and (r.token_id is not None) == sample
    assert engine.release(list(LENGTHS)) == 4
    assert engine.info.kv_blocks_free == 24 and engine.info.active_sequences == 0


@pytest.mark.parametrize("arch", hf_tiny.ARCHS)
def test_greedy_generation_matches_transformers(tiny_hf, arch):
    path, ref = tiny_hf(arch)
    engine = _engine(path, kv_blocks=32)
    prompts = {"p": _tokens(3, seed=7), "q": _tokens(11, seed=8)}
    generated: dict[str, list[int]] = {s: [] for s in prompts}
    works = [SequenceWork(s, p, 0, SamplingParams(temperature=0.0)) for s, p in prompts.items()]
    for _ in range(32):
        for r in engine.step(works):
            generated[r.seq_id].append(r.token_id)
        works = [SequenceWork(s, [generated[s][-1]], len(prompts[s]) + len(generated[s]) - 1) for s in prompts]
    for s, prompt in prompts.items():
        assert generated[s] == hf_tiny.reference_greedy(ref, prompt, 32), s
