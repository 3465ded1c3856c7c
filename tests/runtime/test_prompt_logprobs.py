"""Prompt logprobs (runtime/prompt_logprobs.py): the engine's log-probabilities of prompt tokens equal log_softmax of a
transformers forward over the same prompt, whole or in prefill chunks mixed with other work; sequences that do not
ask get none, and a sequence that asks takes no prefix-cache hits."""

from __future__ import annotations

import pytest
import torch

import hf_tiny
from hf_tiny import DEVICE
from moemesh.runtime.engine import Engine
from moemesh.runtime.types import SamplingParams, SequenceWork

TOL = 1e-4


def _prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, hf_tiny.VOCAB, (n,), generator=g).tolist()


def _expected(ref, prompt: list[int]) -> torch.Tensor:
    """[L - 1] log P(prompt[q] | prompt[:q]) for q >= 1, from transformers."""
    logp = torch.log_softmax(hf_tiny.reference_logits(ref, prompt), dim=-1)  # [L, V]
    return logp[:-1].gather(1, torch.tensor(prompt[1:]).unsqueeze(1)).squeeze(1)


def _run_chunked(engine: Engine, seq_id: str, prompt: list[int], params: SamplingParams, chunk: int,
                 other: list[int] | None = None) -> list:
    """Prefills `prompt` in chunks (alongside another sequence's prompt when given); returns every prompt entry."""
    entries, pos = [], 0
    while pos < len(prompt):
        end = min(len(prompt), pos + chunk)
        works = [SequenceWork(seq_id, prompt[pos:end], pos, params, sample=end == len(prompt))]
        if other is not None and pos == 0:
            works.append(SequenceWork(f"{seq_id}-other", other, 0, SamplingParams(max_tokens=4)))
        results = engine.step(works)
        entries.extend(results[0].prompt_logprobs)
        if other is not None and pos == 0:
            assert results[1].prompt_logprobs == []  # did not ask: nothing computed for it
        pos = end
    return entries


@pytest.mark.parametrize("arch,chunk", [("llama", 100), ("llama", 5), ("qwen3_moe", 4)])
def test_prompt_logprobs_match_transformers(tiny_hf, arch, chunk):
    path, ref = tiny_hf(arch)
    engine = Engine.load(path, device=DEVICE, kv_blocks=32, block_size=4)
    prompt = _prompt(13, seed=7)
    params = SamplingParams(max_tokens=2, prompt_logprobs=3, prompt_tokens=len(prompt))
    entries = _run_chunked(engine, "s", prompt, params, chunk, other=_prompt(6, seed=8))
    assert len(entries) == len(prompt)
    assert entries[0].logprob is None and entries[0].top == ()
    got = torch.tensor([e.logprob for e in entries[1:]])
    torch.testing.assert_close(got, _expected(ref, prompt), atol=TOL, rtol=0)
    logp = torch.log_softmax(hf_tiny.reference_logits(ref, prompt), dim=-1)
    for q, e in enumerate(entries[1:], start=1):  # top-3 at each position: the reference's 3 most likely
        assert len(e.top) == 3
        assert [t for t, _ in e.top] == logp[q - 1].topk(3).indices.tolist()


def test_asking_sequence_skips_the_prefix_cache_and_others_still_hit(tiny_hf):
    path, ref = tiny_hf("llama")
    engine = Engine.load(path, device=DEVICE, kv_blocks=32, block_size=4)
    prompt = _prompt(12, seed=3)
    warm = engine.step([SequenceWork("warm", prompt, 0, SamplingParams(max_tokens=2))])[0]
    assert warm.cached_tokens == 0
    plain = engine.step([SequenceWork("plain", prompt, 0, SamplingParams(max_tokens=2))])[0]
    assert plain.cached_tokens == 8  # two full blocks of 4 (the last token is always computed)
    asked = engine.step([SequenceWork("asked", prompt, 0, SamplingParams(max_tokens=2, prompt_logprobs=0))])[0]
    assert asked.cached_tokens == 0
    got = torch.tensor([e.logprob for e in asked.prompt_logprobs[1:]])
    torch.testing.assert_close(got, _expected(ref, prompt), atol=TOL, rtol=0)
    assert all(e.top == () for e in asked.prompt_logprobs)  # 0 alternatives asked
    # Decoding after the prompt adds no prompt entries.
    decode = engine.step([SequenceWork("asked", [asked.token_id], len(prompt), None)])[0]
    assert decode.prompt_logprobs == []
