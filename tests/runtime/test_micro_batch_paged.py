"""Ping-pong halves in the GPU decode runner (gpu/decode_graphs.py, run(..., second=)), on the CPU under Triton's
interpreter (the paged attention kernel): the split step's logits equal the unsplit runner's and the CPU engine's,
with the cut between the halves falling inside a sequence's prefill chunk (its later rows in half B read the K/V
half A wrote in the same layer). On a GPU the same code runs eagerly or captured in the runner's split graphs. Runs
in a fresh interpreter (see test_gpu_kernels_interpreted.py for why); slow: ~75 s on the loaded 2-core machine."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from moemesh.runtime.dispatch import LocalDispatch
from moemesh.runtime.engine import Engine
from moemesh.runtime.micro_batch import MicroBatching

from test_gpu_kernels import cuda, interpreter  # noqa: E402 (skips off CUDA, naming what is missing)

CHECK = textwrap.dedent('''
    import sys
    import torch
    from moemesh.runtime.dispatch import LocalDispatch
    from moemesh.runtime.engine import Engine
    from moemesh.runtime.gpu.decode_graphs import DecodeRunner
    from moemesh.runtime.types import SamplingParams, SequenceWork

    engine = Engine.load(sys.argv[1], kv_blocks=32, block_size=4)
    sampling = SamplingParams(max_tokens=8)
    first = engine.step([SequenceWork(f"s{i}", [3 + i, 5, 7, 9 + i, 11, 13][:2 + i % 4], 0, sampling) for i in range(6)]
                        + [SequenceWork("c", [20, 21, 22, 23], 0, sampling, sample=False)])
    # One row per token: 6 decode tokens, then 3 prompt tokens of "c" -> 9 rows, bucket 16, halves [0:8] [8:16]:
    # the cut falls between c's first and second new token.
    works = [SequenceWork(r.seq_id, [r.token_id], engine.cached_length(r.seq_id), None) for r in first[:6]]
    works.append(SequenceWork("c", [24, 25, 26], 4, None))
    engine.blocks.reserve({w.seq_id: w.position + len(w.token_ids) for w in works})
    tokens, positions, tables, keep = [], [], [], []
    for w in works:
        tokens += w.token_ids
        positions += range(w.position, w.position + len(w.token_ids))
        tables += [engine.blocks.table(w.seq_id)] * len(w.token_ids)
        keep.append(len(tokens) - 1)
    trash = 31
    assert all(trash not in t for t in tables)
    runner = DecodeRunner(engine.backbone, engine.dispatch, engine.cache.pools, 4, 8, trash, torch.device("cpu"),
                          graphs=False)
    with torch.inference_mode():
        whole = runner.run(tokens, positions, tables, keep)
        split = runner.run(tokens, positions, tables, keep, second=LocalDispatch(engine.dispatch.bank))
    assert (split - whole).abs().max() < 1e-5, f"split vs whole: {(split - whole).abs().max()}"
    _, cpu = engine.step_with_logits(works)  # the same step on the CPU path (gather + SDPA)
    assert (split - cpu).abs().max() < 1e-4, f"split vs CPU engine: {(split - cpu).abs().max()}"
    print("ok")
''')


@pytest.mark.slow
@interpreter
def test_decode_runner_halves_under_the_triton_interpreter(tiny_moe_dir):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", CHECK, str(tiny_moe_dir)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


@cuda
def test_split_steps_in_captured_graphs_match_the_unsplit_engine(tmp_path):
    """On the GPU: prefill (75 rows, bucket 128) and decode (6 rows, bucket 8) steps split in two halves inside the
    runner's CUDA graphs give the unsplit engine's logits (bf16: relative error as test_gpu_kernels allows)."""
    from test_gpu_kernels import _decode_logits, _qwen3_config, _rel

    path = _qwen3_config(tmp_path)
    kw = dict(load_format="dummy", device="cuda", dtype=torch.bfloat16, kv_blocks=64, block_size=16)
    plain, split = Engine.load(path, **kw), Engine.load(path, **kw)
    split.micro = MicroBatching(LocalDispatch(split.dispatch.bank), 2)
    prompts = [[3 + i] * (5 + 3 * i) for i in range(6)]
    want, got = _decode_logits(plain, prompts, 20), _decode_logits(split, prompts, 20)
    assert all(_rel(g, w) < 3e-2 for g, w in zip(got, want)), [_rel(g, w) for g, w in zip(got, want)]
    assert sorted(split.decode.split_graphs) == [8, 128] and not split.decode.graphs
