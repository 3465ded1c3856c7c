"""The benchmark's figures: percentiles, TTFT/ITL/e2e from chunk times, throughput, failures, and LoadSpec's
validation (errors name the flag), prompts and Poisson arrivals."""

from __future__ import annotations

import itertools
import statistics

import pytest

from moemesh.bench.stats import RequestRecord, distribution_ms, percentile, summarize
from moemesh.bench.workload import LoadSpec, poisson_offsets, synthetic_prompt


def test_percentile_interpolates_like_numpy():
    values = [1.0, 2.0, 3.0, 4.0, 10.0]
    assert [percentile(values, q) for q in (0, 50, 95, 99, 100)] == pytest.approx([1.0, 3.0, 8.8, 9.76, 10.0])
    assert percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_distribution_in_ms_and_empty_is_all_none():
    assert distribution_ms([0.001, 0.003]) == {"mean": 2.0, "p50": 2.0, "p95": 2.9, "p99": 2.98}
    assert distribution_ms([]) == {"mean": None, "p50": None, "p95": None, "p99": None}


def test_summary_of_completed_and_failed_requests():
    a = RequestRecord(start=0.0, chunk_times=[0.1, 0.3, 0.4], end=0.5, output_tokens=3, prompt_tokens=10)
    b = RequestRecord(start=1.0, chunk_times=[1.2, 1.6], end=1.6, output_tokens=2, prompt_tokens=20)
    bad = RequestRecord(start=0.0, end=0.1, error="UNAVAILABLE: shard down")
    out = summarize([a, b, bad], duration_s=2.0)
    assert (out["completed"], out["failed"], out["output_tokens"]) == (2, 1, 5)
    assert out["output_tokens_per_s"] == 2.5 and out["requests_per_s"] == 1.0 and out["prompt_tokens_mean"] == 15
    assert out["ttft_ms"]["mean"] == pytest.approx(150.0)  # 100 and 200 ms
    assert (out["itl_ms"]["p50"], out["itl_ms"]["mean"]) == pytest.approx((200.0, 700 / 3), abs=1e-3)  # 200, 100, 400
    assert out["e2e_ms"]["p50"] == pytest.approx(550.0)
    assert out["errors"] == {"UNAVAILABLE: shard down": 1}


@pytest.mark.parametrize(("fields", "flag"), [
    (dict(concurrency=0), "--concurrency: 0"), (dict(requests=0), "--requests: 0"),
    (dict(requests=None), "--requests: None must be given"), (dict(duration_s=-1.0), "--duration: -1.0"),
    (dict(rate=0.0), "--rate: 0.0"), (dict(rate=float("inf")), "--rate: inf"),
    (dict(prompt_tokens=0), "--prompt-tokens: 0"), (dict(max_tokens=0), "--max-tokens: 0"),
    (dict(temperature=3.0), "--temperature: 3.0"),
])
def test_bad_load_names_the_flag(fields, flag):
    with pytest.raises(ValueError, match=f"^{flag}"):
        LoadSpec(**fields)


def test_requests_and_duration_both_bound_the_run():
    spec = LoadSpec(requests=3, duration_s=10.0)
    assert [spec.more(i, 1.0) for i in range(4)] == [True, True, True, False]
    assert not spec.more(0, 10.0)
    assert LoadSpec(requests=None, duration_s=5.0).more(10**6, 4.9)


def test_prompts_are_deterministic_distinct_and_of_the_asked_length():
    assert synthetic_prompt(3, 50, seed=1) == synthetic_prompt(3, 50, seed=1)
    assert len({synthetic_prompt(i, 50) for i in range(20)}) == 20
    assert len(synthetic_prompt(0, 50).split()) == 50


def test_poisson_arrivals_have_the_asked_rate():
    offsets = list(itertools.islice(poisson_offsets(rate=4.0, seed=7), 4001))
    assert offsets[0] == 0.0 and offsets == sorted(offsets)
    gaps = [b - a for a, b in zip(offsets, offsets[1:])]
    assert statistics.mean(gaps) == pytest.approx(0.25, rel=0.05)
    assert statistics.stdev(gaps) == pytest.approx(0.25, rel=0.1)  # exponential: stdev == mean
