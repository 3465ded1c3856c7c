"""The conversion model (teacher/student) against transformers, its KV cache, and self-generated text."""

from __future__ import annotations

from pathlib import Path

import torch

from moemesh.convert.checkpoint import build_dense, read_dense
from moemesh.convert.selfgen import first_tokens, sample_next, self_generated


def test_dense_forward_matches_transformers_and_the_cache_matches_the_full_forward(tiny_dense_dir: Path) -> None:
    from transformers import LlamaForCausalLM

    ours = build_dense(read_dense(tiny_dense_dir))
    hf = LlamaForCausalLM.from_pretrained(tiny_dense_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, 49152, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = ours(ids)
        assert (full - hf(ids).logits).abs().max() <= 1e-4
        cache: list = []
        steps = [ours(ids[:, :12], cache=cache)[:, -1]]
        steps += [ours(ids[:, t:t + 1], cache=cache, start=t)[:, -1] for t in range(12, 20)]
    assert (torch.stack(steps, 1) - full[:, 11:]).abs().max() <= 1e-4


def test_self_generated_text_is_seeded_and_starts_half_in_chat(tiny_dense_dir: Path) -> None:
    model = build_dense(read_dense(tiny_dense_dir))
    a = self_generated(model, tiny_dense_dir, 4, 10, seed=3)
    b = self_generated(model, tiny_dense_dir, 4, 10, seed=3)
    assert a.shape == (4, 10) and torch.equal(a, b)
    assert not torch.equal(a, self_generated(model, tiny_dense_dir, 4, 10, seed=4))
    first = first_tokens(tiny_dense_dir, 49152, 6, torch.Generator().manual_seed(0))[:, 0].tolist()
    assert first[:3] == [1, 1, 1]  # <|im_start|> in SmolLM2's vocabulary
    assert all(t != 1 for t in first[3:])


def test_nucleus_sampling_never_picks_outside_the_nucleus() -> None:
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.05, 0.05]])).repeat(200, 1)
    picks = sample_next(logits, torch.Generator().manual_seed(0), top_p=0.85)
    assert set(picks.tolist()) == {0, 1}
