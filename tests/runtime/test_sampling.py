"""Sampler: greedy, seeds, truncation, penalties, logprobs, the sampled distribution, parameter validation."""

import dataclasses
import math
import re

import pytest
import torch

from moemesh.runtime.sampling import Sampler, SeqSampleState, validate
from moemesh.runtime.types import SamplingParams


def sample(logits, params, states=None):
    states = states or [SeqSampleState.new(p, logits.device) for p in params]
    return Sampler().sample(logits, params, states)


def ids(outs):
    return [o.token_id for o in outs]


def test_greedy_is_argmax():
    logits = torch.randn(16, 300, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(), SamplingParams(top_k=5, top_p=0.3, seed=4)] * 8  # truncation is moot at t=0
    assert ids(sample(logits, params)) == logits.argmax(-1).tolist()


def test_greedy_ties_take_the_first_index():
    logits = torch.tensor([[0.0, 3.0, 3.0, 1.0]])
    assert ids(sample(logits, [SamplingParams()])) == [1]


def draw_sequence(seed, logits, steps=30, batch_noise=False):
    """Tokens drawn for one seeded sequence; with batch_noise the row shares each batch with unseeded rows."""
    params = SamplingParams(temperature=1.0, seed=seed)
    state = SeqSampleState.new(params)
    out = []
    for step in range(steps):
        if batch_noise:
            others = [SamplingParams(temperature=1.0)] * (step % 3)
            rows = torch.cat([logits.expand(len(others), -1), logits])
            out.append(ids(sample(rows, others + [params], [SeqSampleState.new(p) for p in others] + [state]))[-1])
        else:
            out.append(ids(sample(logits, [params], [state]))[0])
    return out


def test_same_seed_same_tokens_whatever_the_batch():
    logits = torch.zeros(1, 50)  # uniform: every draw matters
    alone = draw_sequence(7, logits)
    assert alone == draw_sequence(7, logits)
    assert alone == draw_sequence(7, logits, batch_noise=True)
    assert len(set(alone)) > 5


def test_different_seeds_differ():
    logits = torch.zeros(1, 50)
    assert draw_sequence(1, logits) != draw_sequence(2, logits)


def test_unseeded_rows_follow_the_global_generator():
    logits = torch.zeros(4, 1000)
    params = [SamplingParams(temperature=1.0)] * 4
    torch.manual_seed(123)
    first = ids(sample(logits, params))
    torch.manual_seed(123)
    assert ids(sample(logits, params)) == first
    assert ids(sample(logits, params)) != first


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = torch.randn(32, 200, generator=torch.Generator().manual_seed(1))
    greedy = logits.argmax(-1).tolist()
    for p in (SamplingParams(temperature=1.5, top_k=1, seed=3), SamplingParams(temperature=1.5, top_p=1e-6, seed=3)):
        assert ids(sample(logits, [p] * 32)) == greedy


def test_penalties_change_the_argmax():
    logits = torch.tensor([[2.0, 1.5, 0.0]])
    cases = [  # (params, how often token 0 already appeared in the completion, expected greedy token)
        (SamplingParams(), 5, 0),
        (SamplingParams(presence_penalty=0.6), 1, 1),
        (SamplingParams(presence_penalty=0.6), 0, 0),  # not in the completion: no penalty
        (SamplingParams(frequency_penalty=0.3), 1, 0),  # 2.0 - 0.3 > 1.5
        (SamplingParams(frequency_penalty=0.3), 2, 1),  # 2.0 - 0.6 < 1.5
        (SamplingParams(presence_penalty=-1.0), 1, 0),
    ]
    for params, count, expected in cases:
        state = SeqSampleState.new(params)
        for _ in range(count):
            state.observe(0)
        assert ids(sample(logits, [params], [state])) == [expected], (params, count)


def test_sample_observes_the_chosen_token():
    """Greedy with a frequency penalty on fixed logits alternates, because each pick is counted."""
    params = SamplingParams(frequency_penalty=1.0)
    state = SeqSampleState.new(params)
    logits = torch.tensor([[1.0, 0.5, -5.0]])
    picks = [ids(sample(logits, [params], [state]))[0] for _ in range(4)]
    assert picks == [0, 1, 0, 1]
    assert state.counts == {0: 2, 1: 2}


def test_logprobs_are_log_softmax_of_penalised_scaled_logits():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(2))
    params = [
        SamplingParams(logprobs=True, top_logprobs=5),
        SamplingParams(temperature=0.7, top_k=3, seed=1, logprobs=True, top_logprobs=2, presence_penalty=0.5),
        SamplingParams(temperature=0.7),
    ]
    states = [SeqSampleState.new(p) for p in params]
    states[1].observe(int(logits[1].argmax()))
    penalised = logits.clone()
    penalised[1, int(logits[1].argmax())] -= 0.5
    outs = sample(logits, params, states)
    for row, temp in ((0, 1.0), (1, 0.7)):
        expected = torch.log_softmax(penalised[row] / temp, -1)
        out = outs[row]
        assert out.logprob == pytest.approx(expected[out.token_id].item(), abs=1e-6)
        top = expected.topk(params[row].top_logprobs)
        assert [t for t, _ in out.top_logprobs] == top.indices.tolist()
        assert [v for _, v in out.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-6)
    assert outs[2].logprob is None and outs[2].top_logprobs == []


def frequencies(logits_row, params, n=6000, device="cpu"):
    """Empirical distribution of n draws, each from its own seeded sequence (deterministic)."""
    all_params = [dataclasses.replace(params, seed=s) for s in range(n)]
    outs = sample(logits_row.expand(n, -1).contiguous().to(device), all_params)
    counts = torch.bincount(torch.tensor(ids(outs)), minlength=logits_row.shape[-1]).float()
    return (counts / n).tolist()


@pytest.mark.parametrize(
    "params, expected",
    [
        (SamplingParams(temperature=1.0), [0.5, 0.3, 0.2, 0.0]),
        (SamplingParams(temperature=0.5), [0.25 / 0.38, 0.09 / 0.38, 0.04 / 0.38, 0.0]),  # p^(1/T), renormalised
        (SamplingParams(temperature=2.0), [x / sum(math.sqrt(y) for y in (0.5, 0.3, 0.2)) for x in
                                           (math.sqrt(0.5), math.sqrt(0.3), math.sqrt(0.2))] + [0.0]),
        (SamplingParams(temperature=1.0, top_k=2), [0.625, 0.375, 0.0, 0.0]),
        (SamplingParams(temperature=1.0, top_p=0.6), [0.625, 0.375, 0.0, 0.0]),  # 0.5 < 0.6: needs the second
        (SamplingParams(temperature=1.0, top_p=0.5), [1.0, 0.0, 0.0, 0.0]),  # 0.5 already reaches 0.5
        (SamplingParams(temperature=1.0, top_k=2, top_p=0.6), [1.0, 0.0, 0.0, 0.0]),  # top-p after renormalising
    ],
)
def test_sampled_distribution(params, expected):
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2, 0.0]]))  # the last token is impossible (-inf)
    got = frequencies(logits, params)
    # Standard error of a frequency at n=6000 is <= 0.0065; 0.025 is ~4 sigma and far below every wrong variant's
    # error (temperature ignored or inverted, truncation off or not renormalised: >= 0.06).
    assert got == pytest.approx(expected, abs=0.025)
    assert got[3] == 0.0


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="N, V"):
        sample(torch.zeros(2, 5), [SamplingParams()])


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("top_p", 1.5),
        ("top_p", -0.1),
        ("top_p", float("nan")),
        ("top_k", -1),
        ("top_k", 2.5),
        ("seed", -1),
        ("seed", 2**64),
        ("presence_penalty", 2.5),
        ("frequency_penalty", float("nan")),
        ("max_tokens", 0),
        ("stop_token_ids", (1, -2)),
        ("stop", ("ok", "")),
        ("top_logprobs", 21),
        ("top_logprobs", -1),
    ],
)
def test_validate_names_the_bad_field(field, value):
    with pytest.raises(ValueError, match=rf"sampling\.{field} .*got {re.escape(repr(value))}"):
        validate(SamplingParams(**{field: value}))


def test_validate_accepts_the_contract_values():
    validate(SamplingParams())
    validate(SamplingParams(top_p=0.0))  # proto3 zero default: off
    validate(SamplingParams(temperature=1.3, top_p=0.9, top_k=40, seed=2**64 - 1, presence_penalty=-2.0,
                            frequency_penalty=2.0, max_tokens=1, stop=("\n",), logprobs=True, top_logprobs=20))


def test_truncation_over_a_large_vocabulary():
    """Vocabularies larger than the top-k/top-p candidate set: the nucleus inside it, and one reaching past it."""
    v = 2000
    peaked = torch.log(torch.tensor([0.4, 0.3, 0.2] + [0.1 / (v - 3)] * (v - 3))).unsqueeze(0)
    got = frequencies(peaked, SamplingParams(temperature=1.0, top_p=0.8), n=3000)
    assert got[:3] == pytest.approx([4 / 9, 3 / 9, 2 / 9], abs=0.04) and sum(got[3:]) == 0
    got = frequencies(peaked, SamplingParams(temperature=1.0, top_k=2), n=3000)
    assert got[:2] == pytest.approx([4 / 7, 3 / 7], abs=0.04) and sum(got[2:]) == 0

    flat = (-0.002 * torch.arange(v, dtype=torch.float32)).unsqueeze(0)  # slowly decaying, all distinct
    probs = torch.softmax(flat[0], -1)
    nucleus = int(((probs.cumsum(0) - probs) < 0.9).sum())  # ~1100 tokens, more than the candidates
    got = torch.tensor(frequencies(flat, SamplingParams(temperature=1.0, top_p=0.9), n=3000))
    assert got[nucleus:].sum() == 0
    beyond = probs[512:nucleus].sum() / probs[:nucleus].sum()  # ~0.38
    assert got[512:].sum().item() == pytest.approx(beyond.item(), abs=0.04)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda():
    """Same greedy choices and logprobs as on CPU, seeded determinism with CUDA generators, right distribution."""
    logits = torch.randn(48, 3000, generator=torch.Generator().manual_seed(3)) * 3
    params = [SamplingParams(logprobs=True, top_logprobs=3, frequency_penalty=0.5),
              SamplingParams(temperature=0.8, top_p=0.9, seed=1, presence_penalty=0.4),
              SamplingParams(temperature=1.2, top_k=20, seed=2, logprobs=True)] * 16
    runs = []
    for device in ("cpu", "cuda", "cuda"):
        states = [SeqSampleState.new(p, device) for p in params]
        runs.append([sample(logits.to(device), params, states) for _ in range(4)])
    for cpu_step, cuda_step, again in zip(*runs):
        assert ids(cuda_step) == ids(again)
        for i in range(0, 48, 3):  # greedy rows
            assert cuda_step[i].token_id == cpu_step[i].token_id
            assert cuda_step[i].logprob == pytest.approx(cpu_step[i].logprob, abs=1e-4)
    logits3 = torch.log(torch.tensor([[0.5, 0.3, 0.2, 0.0]]))
    got = frequencies(logits3, SamplingParams(temperature=0.5), device="cuda")
    assert got == pytest.approx([0.25 / 0.38, 0.09 / 0.38, 0.04 / 0.38, 0.0], abs=0.025)
    got = frequencies(logits3, SamplingParams(temperature=1.0, top_k=2, top_p=0.6), device="cuda")
    assert got == [1.0, 0.0, 0.0, 0.0]
