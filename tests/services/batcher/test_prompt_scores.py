"""Prompt logprobs through the real batcher and router over gRPC with chunked prefill: the prompt's entries arrive
once, in the first token's event, gathered over every chunk, equal to log_softmax of the model's own forward."""

from __future__ import annotations

import torch

from moemesh.runtime.engine import Engine
from moemesh.v1 import batcher_pb2, common_pb2
from tests.services.batcher.mesh import mesh


async def test_chunked_prompt_scores_arrive_once_with_the_first_token(tiny_moe_dir) -> None:
    prompt = list(range(100, 137))  # 37 tokens: 5 chunks of at most 8
    sampling = common_pb2.SamplingParams(max_tokens=3, ignore_eos=True, prompt_tokens=len(prompt),
                                         prompt_logprobs=2)
    async with mesh(tiny_moe_dir, block_size=4, max_step_tokens=8, max_batch_size=4) as m:
        request = batcher_pb2.GenerateRequest(request_id="scored", tenant="t", prompt_ids=prompt, sampling=sampling)
        events = [e async for e in m.batcher.Generate(request)]
    steps = [s for s in m.log if s[0] == "step"]
    assert len(steps) >= 5  # the prompt was prefilled in chunks
    scored = [e for e in events if e.prompt_logprobs]
    assert len(scored) == 1 and scored[0] is events[0] and list(events[0].token_ids)
    entries = events[0].prompt_logprobs
    assert len(entries) == len(prompt) and not entries[0].HasField("logprob")
    assert all(len(e.top_logprobs) == 2 for e in entries[1:])
    logits = Engine.load(tiny_moe_dir, kv_blocks=16).forward_logits([prompt])[0]
    logp = torch.log_softmax(logits, dim=-1)
    expected = logp[:-1].gather(1, torch.tensor(prompt[1:]).unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(torch.tensor([e.logprob for e in entries[1:]]), expected, atol=1e-4, rtol=0)


def test_a_recompute_restarts_undelivered_scores_and_repeats_nothing_delivered() -> None:
    from services.batcher.sequence import Sequence

    seq = Sequence("s", prompt_ids=[1, 2, 3, 4], max_tokens=2)
    seq.add_prompt_scores(0, [(None, []), (-1.0, [])])
    seq.add_prompt_scores(0, [(None, []), (-1.5, [])])  # preempted mid-prefill: recomputed from 0
    seq.add_prompt_scores(2, [(-2.0, []), (-3.0, [])])
    assert seq.take_prompt_scores() == [(None, []), (-1.5, []), (-2.0, []), (-3.0, [])]
    seq.add_prompt_scores(0, [(None, []), (-1.5, [])])  # a recompute after delivery: dropped
    assert seq.take_prompt_scores() == []
