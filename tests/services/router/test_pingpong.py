"""Ping-pong micro-batches with real shard processes (tiny MoE, 2 shards): a router that splits every step of >= 2
sequences gives the in-process engine's logits (1e-5, float32) and greedy tokens over prefill chunks and decode
steps, over shared memory and gRPC; the second set of links is built only when asked (off by default) and never for
experts in the router; a shard killed under a split step fails it with UNAVAILABLE and split steps run again once it
is back."""

from __future__ import annotations

import time

import pytest
import torch

from moemesh.runtime.engine import Engine
from moemesh.runtime.types import SamplingParams, SequenceWork
from moemesh.serving.config import ConfigError
from services.router.__main__ import build_router
from services.router.expert_client import ExpertCallError
from tests.services.router.test_shm_transport import (  # noqa: F401 (shards: the fixture)
    BLOCK, config, KV_BLOCKS, PROMPT, shards)


def _works(step: int, last: dict[str, int], engine) -> list[SequenceWork]:
    """Step 0: 7 prompts of different lengths + the first chunk of a long one; later: decode every sequence,
    the long prompt's second chunk in step 1 (in the middle of the batch)."""
    sampling = SamplingParams(max_tokens=32)
    if step == 0:
        works = [SequenceWork(f"s{i}", (PROMPT * 3)[i:i + 3 + 2 * i], 0, sampling) for i in range(7)]
        return works + [SequenceWork("long", (PROMPT * 4)[:24], 0, sampling, sample=False)]
    works = [SequenceWork(s, [t], engine.cached_length(s), None) for s, t in last.items()]
    if step == 1:
        works.insert(3, SequenceWork("long", (PROMPT * 4)[24:40], 24, None))
    return works


def _run(steps: int, step_fn, engine) -> list[tuple[list, torch.Tensor]]:
    out, last = [], {}
    for n in range(steps):
        results, logits = step_fn(_works(n, last, engine))
        last = {r.seq_id: r.token_id for r in results if r.token_id is not None}
        out.append(([(r.seq_id, r.token_id) for r in results], logits))
    return out


# shm runs first and waits for the shard processes to load (~10 s quiet, 40 s on the loaded 2-core machine)
@pytest.mark.parametrize("transport", [pytest.param("shm", marks=pytest.mark.slow), "grpc"])
def test_split_steps_keep_the_in_process_logits(shards, tiny_moe_dir, transport):
    local = Engine.load(tiny_moe_dir, kv_blocks=KV_BLOCKS, block_size=BLOCK)
    want = _run(5, local.step_with_logits, local)
    router = build_router(config(tiny_moe_dir, [s.address for s in shards], expert_transport=transport,
                                 pingpong_min_seqs=2))
    try:
        micro = router.engine.micro
        assert micro is not None and micro.min_seqs == 2
        assert micro.second.transports() == [transport] * 2 and micro.second is not router.dispatch
        got = _run(5, lambda works: router.worker.call(router.engine.step_with_logits, works), router.engine)
        assert micro.steps == 5
    finally:
        router.close()
    for (tokens, logits), (want_tokens, want_logits) in zip(got, want):
        assert tokens == want_tokens
        torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5)


def test_where_the_split_is_built(shards, tiny_moe_dir):
    in_process = build_router(config(tiny_moe_dir, [], pingpong_min_seqs=8))
    try:
        assert in_process.engine.micro is None  # experts in the router: never split
    finally:
        in_process.close()
    default = build_router(config(tiny_moe_dir, [s.address for s in shards]))
    try:
        assert default.engine.micro is None  # off by default (benchmarks/results/pingpong-cpu.md)
    finally:
        default.close()
    with pytest.raises(ConfigError, match="pingpong-min-seqs.*-1"):
        config(tiny_moe_dir, [s.address for s in shards], pingpong_min_seqs=-1)


def test_a_killed_shard_fails_the_split_step_and_splitting_resumes(shards, tiny_moe_dir):
    router = build_router(config(tiny_moe_dir, [s.address for s in shards], pingpong_min_seqs=2,
                                 stall_timeout=0.5))
    engine = router.engine

    def fresh_batch(steps: int) -> None:  # new sequences each time (a failed step leaves no state behind)
        router.worker.call(engine.release, [f"s{i}" for i in range(7)] + ["long"])
        _run(steps, lambda works: router.worker.call(engine.step_with_logits, works), engine)

    try:
        fresh_batch(1)
        shards[1].stop()
        start = time.monotonic()
        with pytest.raises(ExpertCallError) as failed:
            fresh_batch(1)
        assert failed.value.code.name == "UNAVAILABLE" and time.monotonic() - start < 5
        shards[1].start()
        deadline = time.monotonic() + 60
        while True:
            try:
                fresh_batch(2)
                break
            except ExpertCallError:
                assert time.monotonic() < deadline, "split steps did not resume after the shard came back"
                time.sleep(0.3)
        assert engine.micro.steps >= 3
    finally:
        router.close()
