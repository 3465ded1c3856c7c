"""The in-process load on the real tiny MoE Engine: continuous batching up to the concurrency gives the same greedy
tokens as runtime.generate, ignore_eos runs every request to max_tokens, Poisson requests start no earlier than they
arrive, and a step the engine refuses fails its requests without ending the run."""

from __future__ import annotations

import pytest

from moemesh.bench.in_process import InProcessRun, kv_blocks_for
from moemesh.bench.stats import summarize
from moemesh.bench.workload import LoadSpec, poisson_offsets, synthetic_prompt
from moemesh.runtime.engine import Engine
from moemesh.runtime.generate import generate
from moemesh.runtime.types import SamplingParams
from moemesh.tokenization.chat_tokenizer import ChatTokenizer


class Watched:
    """The engine, with a record of each step's batch and of the tokens each sequence got."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.batches, self.tokens = engine, [], {}
        self.info = engine.info

    def step(self, works):
        results = self.engine.step(works)
        self.batches.append(len(works))
        for r in results:
            self.tokens.setdefault(r.seq_id, []).append(r.token_id)
        return results

    def release(self, seq_ids):
        return self.engine.release(seq_ids)


@pytest.fixture(scope="module")
def encode(tiny_moe_dir):
    tokenizer = ChatTokenizer.load(tiny_moe_dir)
    return lambda text: tokenizer.encode(text, add_special_tokens=False)


def test_continuous_batching_gives_generates_tokens_within_the_concurrency(tiny_moe_dir, encode):
    spec = LoadSpec(concurrency=3, requests=7, prompt_tokens=6, max_tokens=5, ignore_eos=True)
    engine = Watched(Engine.load(tiny_moe_dir, kv_blocks=kv_blocks_for(spec, 16)))
    records, duration = InProcessRun(engine, encode, spec).run()
    out = summarize(records, duration)
    assert (out["completed"], out["failed"], out["output_tokens"]) == (7, 0, 35)
    assert max(engine.batches) == 3 and 3 < len(engine.batches) < 7 * 5  # batched, and joined while others ran
    prompts = [encode(synthetic_prompt(i, 6)) for i in range(7)]
    expected = generate(engine.engine, prompts, SamplingParams(max_tokens=5, ignore_eos=True), max_running=3)
    assert [engine.tokens[f"bench-{i}"] for i in range(7)] == [c.token_ids for c in expected]
    assert all(len(r.chunk_times) == 5 and r.start < r.chunk_times[0] < r.end for r in records)
    assert engine.engine.info.active_sequences == 0  # every finished sequence released its KV blocks


def test_poisson_requests_start_no_earlier_than_they_arrive(tiny_moe_dir, encode):
    spec = LoadSpec(concurrency=2, requests=5, rate=20.0, prompt_tokens=4, max_tokens=2, seed=5)
    run = InProcessRun(Engine.load(tiny_moe_dir, kv_blocks=kv_blocks_for(spec, 16)), encode, spec)
    records, _ = run.run()
    arrivals = [offset for _, offset in zip(range(5), poisson_offsets(20.0, seed=5))]
    assert all(r.ok for r in records)
    assert all(r.start - run._start >= a - 1e-6 for r, a in zip(records, arrivals))


def test_a_refused_step_fails_its_requests_and_the_run_goes_on(tiny_moe_dir, encode):
    spec = LoadSpec(concurrency=2, requests=4, prompt_tokens=6, max_tokens=20, ignore_eos=True)
    engine = Engine.load(tiny_moe_dir, kv_blocks=2, block_size=16)  # 32 tokens: not two sequences at once
    records, duration = InProcessRun(engine, encode, spec).run()
    out = summarize(records, duration)
    assert out["failed"] >= 2 and out["completed"] + out["failed"] == 4
    assert any(error.startswith("CapacityError") for error in out["errors"])
