"""Sampler extensions of issue 17: logit_bias, repetition penalty, grammar masks (xgrammar) and their replay after
a recompute, on the built-in model's real tokenizer."""

from __future__ import annotations

import json

import torch

from moemesh.runtime.grammar import GrammarBook
from moemesh.runtime.sampling import Sampler, SeqSampleState
from moemesh.runtime.types import Guided, SamplingParams

V = 49152


def test_logit_bias_forces_and_bans_tokens() -> None:
    logits = torch.zeros(2, V)
    params = [SamplingParams(logit_bias=((7, 100.0),)), SamplingParams(logit_bias=((0, -100.0),))]
    outs = Sampler().sample(logits, params, [SeqSampleState.new(p) for p in params])
    assert outs[0].token_id == 7 and outs[1].token_id == 1  # greedy: first index once token 0 is banned


def test_repetition_penalty_demotes_seen_tokens() -> None:
    logits = torch.zeros(1, V)
    logits[0, 5], logits[0, 6] = 2.0, 1.5
    state = SeqSampleState.new(SamplingParams())
    state.fed([5], 0, None)  # token 5 is in the prompt
    out = Sampler().sample(logits, [SamplingParams(repetition_penalty=1.5)], [state])
    assert out[0].token_id == 6  # 2.0 / 1.5 < 1.5


def test_grammar_masks_every_step_and_replays_after_recompute(builtin_dense_dir) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    book = GrammarBook(builtin_dense_dir, V, (2, 0))
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=30, guided=Guided(json_schema=json.dumps(schema)),
                            prompt_tokens=2)
    state = SeqSampleState.new(params)
    state.grammar = book.sequence(params.guided, params.max_tokens)
    out = []
    for _ in range(30):
        token = Sampler().sample(torch.randn(1, V), [params], [state])[0].token_id
        if token in (0, 2):
            break
        out.append(token)
    assert json.loads("".join(book.texts[t] for t in out))["n"] is not None
    again = SeqSampleState.new(params)  # a preempted sequence re-fed from position 0: prompt + output
    again.grammar = book.sequence(params.guided, params.max_tokens)
    again.fed([11, 12, *out], 0, prompt_tokens=2)
    assert again.replayed == len(out) and again.grammar.matcher.is_terminated() is False
    assert again.grammar.accepted == len(out)
