"""The batcher's small parts: config validation, the KV ledger, meters, token windows, protobuf mapping."""

from __future__ import annotations

import time

import pytest

from moemesh.serving.config import ConfigError
from moemesh.v1 import batcher_pb2, common_pb2
from services.batcher.config import BatcherConfig
from services.batcher.kv_view import KvView
from services.batcher.meters import BusyMeter
from services.batcher.sequence import Finish, Sequence
from services.batcher.servicer import deadline_from, event_to_proto, sequence_from_proto
from services.batcher.step import Event, InvalidRequest
from tests.services.batcher.sim import Clock


def test_config_defaults_match_the_documented_knobs():
    c = BatcherConfig.from_args([], env={})
    p = c.policy()
    assert (p.mode, p.max_batch_size, p.max_wait, p.max_queue) == ("continuous", 32, 0.1, 1024)
    env = {"MOEMESH_BATCHER_MODE": "static", "ROUTER_ADDR": "10.0.0.5:7000", "MOEMESH_BATCHER_MAX_WAIT_MS": "20"}
    c = BatcherConfig.from_args(["--max-batch-size", "8"], env=env)
    assert (c.mode, c.router_addr, c.policy().max_wait, c.max_batch_size) == ("static", "10.0.0.5:7000", 0.02, 8)


def test_prefix_hold_reaches_the_policy_from_flag_and_env():
    assert BatcherConfig.from_args([], env={}).policy().prefix_hold == 10.0  # the documented default
    env = {"MOEMESH_BATCHER_PREFIX_HOLD": "2.5"}
    assert BatcherConfig.from_args([], env=env).policy().prefix_hold == 2.5
    assert BatcherConfig.from_args(["--prefix-hold", "0"], env=env).policy().prefix_hold == 0.0  # flag over env


@pytest.mark.parametrize("argv, words", [
    (["--max-wait-ms", "-1"], "--max-wait-ms"),
    (["--max-step-tokens", "8"], "--max-step-tokens"),
    (["--mode", "turbo"], "'turbo'"),
    (["--kv-watermark", "1.5"], "--kv-watermark"),
    (["--router-addr", "nowhere"], "'nowhere'"),
    (["--max-queue", "0"], "--max-queue"),
    (["--prefix-hold", "-1"], "PREFIX_HOLD: -1.0"),
    (["--prefix-hold", "nan"], "PREFIX_HOLD: nan"),
])
def test_bad_config_names_the_flag_and_value(argv, words):
    with pytest.raises(ConfigError, match=words):
        BatcherConfig.from_args(argv, env={})


def test_kv_view_plans_on_what_the_router_reports():
    kv = KvView(block_size=4, total_blocks=5, watermark_blocks=1)
    kv.take(0, 5)  # a new sequence of 5 tokens: 2 blocks
    assert kv.free == 3
    assert kv.fit(5, 100) == 3 * 4 + 8 - 5  # its slack in block 2 plus three free blocks
    assert kv.fit(0, 100, keep_free=1) == 8
    kv.observe(router_free=2, own={"a": 1, "b": 1})  # a shares one of its 2 blocks (a prefix-cache hit)
    assert (kv.claimed, kv.free) == (0, 2)
    kv.release("a")  # leaving: only the block it holds alone comes back
    assert kv.free == 3
    kv.sent(["a"])
    assert kv.free == 3
    kv.observe(router_free=3, own={"b": 2})  # the router applied the release: b now holds both alone
    assert kv.free == 3 and "a" not in kv.own
    with pytest.raises(RuntimeError, match="overdraft"):
        kv.take(0, 100)


def test_busy_meter_is_the_fraction_of_the_recent_window():
    clock = Clock(0.0)
    meter = BusyMeter(window=10.0, clock=clock)
    clock.advance(2.0)
    meter.add(1.0)
    assert meter.fraction() == pytest.approx(0.5)  # 1 s busy in the 2 s since start
    clock.advance(10.5)
    meter.add(2.0)
    assert meter.fraction() == pytest.approx(0.2)  # the first second fell out of the 10 s window
    assert meter.total == 3.0


def test_token_window_spans_prompt_and_output():
    s = Sequence(seq_id="s", prompt_ids=[1, 2, 3], max_tokens=5)
    s.output_ids = [7, 8]
    assert [s.window(k, n) for k, n in ((0, 2), (2, 2), (3, 2), (4, 1), (0, 5))] == [
        [1, 2], [3, 7], [7, 8], [8], [1, 2, 3, 7, 8]]


def test_generate_request_maps_to_a_sequence():
    req = batcher_pb2.GenerateRequest(
        request_id="r1", tenant="acme", model="m", prompt_ids=[5, 6], priority=2, tenant_weight=0,
        sampling=common_pb2.SamplingParams(max_tokens=9, stop_token_ids=[4], ignore_eos=True, temperature=0.7),
        deadline_unix_ms=int((time.time() + 5) * 1000))
    now = time.monotonic()
    seq = sequence_from_proto(req, deadline_from(req, time_remaining=2.0, now=now), served_model="m")
    assert (seq.seq_id, seq.tenant, seq.prompt_ids, seq.max_tokens, seq.priority) == ("r1", "acme", [5, 6], 9, 2)
    assert seq.weight == 1.0 and seq.stop_ids == {4} and seq.ignore_eos and seq.sampling.temperature == 0.7
    assert seq.deadline == pytest.approx(now + 2.0)  # the gRPC deadline is the earlier one
    with pytest.raises(InvalidRequest, match="model 'm'"):
        sequence_from_proto(req, None, served_model="other")
    req.tenant_weight = -1
    with pytest.raises(InvalidRequest, match="tenant_weight"):
        sequence_from_proto(req, None, served_model="m")


def test_events_carry_logprobs_only_when_asked():
    ev = Event(seq_id="r", token_ids=[7], logprobs=[-0.5], top_logprobs=[[(7, -0.5), (9, -1.0), (3, -2.0)]],
               finish=Finish.LENGTH, prompt_tokens=2, completion_tokens=3, engine_seconds=0.25, queue_seconds=0.1)
    plain = event_to_proto(ev, common_pb2.SamplingParams())
    assert list(plain.token_ids) == [7] and not plain.logprobs and plain.engine_seconds == 0.25
    assert plain.finish_reason == common_pb2.FINISH_REASON_LENGTH
    rich = event_to_proto(ev, common_pb2.SamplingParams(logprobs=True, top_logprobs=2))
    assert [(lp.token_id, lp.logprob) for lp in rich.top_logprobs] == [(7, -0.5), (9, -1.0)]
