"""The router's steps ahead (services/router/steps_ahead.py) on a real engine: an offered next step is launched
behind the running one and its job only collects it; the tokens equal one step after the other; a step that does
not qualify (or steps ahead off) runs Engine.step. CUDA only (runtime/step_ahead.py needs the decode runner)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from moemesh.runtime.engine import Engine
from moemesh.runtime.gpu import kernels_usable
from moemesh.runtime.types import SamplingParams, SequenceWork
from services.router.steps_ahead import StepsAhead

sys.path.insert(0, str(Path(__file__).parents[2] / "runtime"))
from test_gpu_kernels import _qwen3_config  # noqa: E402

WHY = kernels_usable(torch.device("cuda"), torch.bfloat16)
pytestmark = pytest.mark.skipif(bool(WHY), reason=f"needs CUDA with Triton: {WHY}")
KW = dict(load_format="dummy", device="cuda", dtype=torch.bfloat16, kv_blocks=64, block_size=4)
PROMPTS = [[5 + i] * (3 + 2 * i) for i in range(4)]


def _decode(ahead: StepsAhead, steps: int, offer: bool) -> list[list[int]]:
    """Prefill (step 1), then decode steps 2 .. steps + 1 of follows works, each offered before the step before it
    runs (as the router's event loop does with the batcher's pipelined Step) when `offer`."""
    out = [[r.token_id for r in ahead.step(1, [SequenceWork(f"s{i}", p, 0) for i, p in enumerate(PROMPTS)])]]
    works = {n: [SequenceWork(f"s{i}", [], len(p) + n - 2, None, follows=True) for i, p in enumerate(PROMPTS)]
             for n in range(2, steps + 2)}
    for n in range(2, steps + 2):
        if offer and n + 1 in works:
            ahead.offer(n + 1, works[n + 1])
        out.append([r.token_id for r in ahead.step(n, works[n])])
    return out


def test_offered_steps_are_launched_behind_the_running_one(tmp_path):
    path = _qwen3_config(tmp_path)
    want = _decode(StepsAhead(Engine.load(path, **KW), enabled=False), 10, offer=True)
    ahead = StepsAhead(Engine.load(path, **KW))
    launched = []
    original = ahead.engine.launch
    ahead.engine.launch = lambda works, after=None: launched.append(after is not None) or original(works, after)
    assert _decode(ahead, 10, offer=True) == want
    assert sum(launched) >= 8  # steps 3 .. 11 each went out behind the step before it
    assert not ahead.engine.pending


def test_steps_that_do_not_qualify_run_engine_step(tmp_path):
    engine = Engine.load(_qwen3_config(tmp_path), **KW)
    ahead = StepsAhead(engine)
    first = [SequenceWork(f"s{i}", p, 0, SamplingParams(logprobs=True)) for i, p in enumerate(PROMPTS)]
    assert all(r.logprob is not None for r in ahead.step(1, first))
    works = [SequenceWork(f"s{i}", [], len(p), None, follows=True) for i, p in enumerate(PROMPTS)]
    results = ahead.step(2, works)  # logprobs need the host: Engine.step, logprobs included
    assert all(r.logprob is not None for r in results) and not engine.pending
