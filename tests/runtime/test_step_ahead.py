"""Steps launched ahead (runtime/step_ahead.py): a decode step queued before the previous step's tokens reached the
host gives the same tokens as Engine.step, one step after the other; steps that do not qualify say so (None); an
aborted launch leaves the engine as it was; Engine.step and release settle what is in flight. CUDA only (the decode
runner); run on the H200."""

from __future__ import annotations

import pytest
import torch

from moemesh.runtime.engine import Engine
from moemesh.runtime.gpu import kernels_usable
from moemesh.runtime.types import SamplingParams, SequenceWork

from test_gpu_kernels import _qwen3_config

WHY = kernels_usable(torch.device("cuda"), torch.bfloat16)
cuda = pytest.mark.skipif(bool(WHY), reason=f"needs CUDA with Triton: {WHY}")
KW = dict(load_format="dummy", device="cuda", dtype=torch.bfloat16, kv_blocks=64, block_size=4)
PROMPTS = [[3 + i] * (5 + 3 * i) for i in range(6)]


def _start(engine, sampling=None):
    works = [SequenceWork(f"s{i}", p, 0, sampling=sampling) for i, p in enumerate(PROMPTS)]
    return [r.token_id for r in engine.step(works)], [len(p) for p in PROMPTS]


def _one_by_one(engine, steps):
    tokens, pos = _start(engine)
    out = [tokens]
    for _ in range(steps):
        works = [SequenceWork(f"s{i}", [], p, follows=True) for i, p in enumerate(pos)]
        out.append([r.token_id for r in engine.step(works)])
        pos = [p + 1 for p in pos]
    return out


def _ahead(engine, steps):
    """Each step launched while the previous one is still in flight, finished one step later."""
    tokens, pos = _start(engine)
    out, previous = [tokens], None
    for _ in range(steps):
        works = [SequenceWork(f"s{i}", [], p, follows=True) for i, p in enumerate(pos)]
        launched = engine.launch(works, after=previous)
        assert launched is not None
        if previous is not None:
            assert previous.fed or previous.after is None
            out.append([r.token_id for r in engine.finish(previous)])
        previous, pos = launched, [p + 1 for p in pos]
    out.append([r.token_id for r in engine.finish(previous)])
    return out


@cuda
def test_launched_steps_give_the_tokens_of_one_step_after_the_other(tmp_path):
    path = _qwen3_config(tmp_path)
    want = _one_by_one(Engine.load(path, **KW), 12)  # crosses KV block boundaries
    engine = Engine.load(path, **KW)
    assert _ahead(engine, 12) == want
    assert not engine.pending and engine.cached_length("s0") == len(PROMPTS[0]) + 12
    # the usual path goes on from there
    works = [SequenceWork(f"s{i}", [], len(p) + 12, follows=True) for i, p in enumerate(PROMPTS)]
    assert all(r.token_id is not None for r in engine.step(works))


@cuda
def test_steps_that_need_the_host_are_not_launched(tmp_path):
    engine = Engine.load(_qwen3_config(tmp_path), **KW)
    _start(engine, SamplingParams(presence_penalty=0.5))
    pos = [len(p) for p in PROMPTS]
    # sampling None: the sequence's own (with a penalty over its counts, which the host keeps)
    assert engine.launch([SequenceWork(f"s{i}", [], p, None, follows=True) for i, p in enumerate(pos)]) is None
    assert engine.launch([SequenceWork("new", [5, 6], 0)]) is None  # a prompt
    assert not engine.pending


@cuda
def test_abort_and_settle(tmp_path):
    engine = Engine.load(_qwen3_config(tmp_path), **KW)
    _, pos = _start(engine)
    first = engine.launch([SequenceWork(f"s{i}", [], p, follows=True) for i, p in enumerate(pos)])
    second = engine.launch([SequenceWork(f"s{i}", [], p + 1, follows=True) for i, p in enumerate(pos)], after=first)
    free = engine.blocks.free_blocks
    engine.abort(second)  # as if `first` had failed: the second step's claims and states are undone
    assert engine.pending == [first] and engine.cached_length("s0") == pos[0] + 1
    assert engine.blocks.free_blocks >= free
    assert engine.release(["s5"]) == 1  # settles `first`; its results wait in it
    assert not engine.pending and len(engine.finish(first)) == len(PROMPTS)
    works = [SequenceWork(f"s{i}", [], p + 1, follows=True) for i, p in enumerate(pos[:5])]
    assert all(r.token_id is not None for r in engine.step(works))
