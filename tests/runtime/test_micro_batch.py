"""Ping-pong micro-batches (moemesh/runtime/micro_batch.py) in process: where a step splits, the A/B interleaving of
submit and collect, and split steps (prefill chunks + decode, shared expert, a dense layer, KV across steps) giving
the unsplit engine's logits and greedy tokens. Real shard processes: tests/services/router/test_pingpong.py."""

from __future__ import annotations

import pytest
import torch

from moemesh.runtime.dispatch import LocalDispatch
from moemesh.runtime.engine import Engine
from moemesh.runtime.micro_batch import MicroBatching, split_point
from moemesh.runtime.types import SamplingParams, SequenceWork


def test_split_point_balances_tokens_on_sequence_boundaries():
    assert split_point([1] * 8, 8) == 4
    assert split_point([1] * 7, 8) is None  # below the threshold
    assert split_point([1] * 8, 0) is None  # 0: off
    assert split_point([1, 1], 1) == 1  # never an empty half
    assert split_point([30, 1, 1, 1, 1, 1, 1, 1], 8) == 1  # a long prefill chunk is a half on its own
    assert split_point([1, 1, 1, 1, 1, 1, 1, 9], 8) == 7
    assert split_point([4, 4, 1, 1, 1, 1, 1, 1], 2) == 2  # 8 | 6
    assert split_point([4, 4, 1, 1, 1, 1], 2) == 1  # 4 | 8 and 8 | 4 tie: the first


class Recording(LocalDispatch):
    """In-process experts that log (event, name, layer, rows) to a shared list: shows the order the halves run in."""

    def __init__(self, bank, name: str, log: list) -> None:
        super().__init__(bank)
        self.name, self.log = name, log

    def submit(self, layer, hidden, topk_ids, topk_weights):
        self.log.append(("submit", self.name, layer, hidden.shape[0]))
        return super().submit(layer, hidden, topk_ids, topk_weights)

    def collect(self, handle):
        self.log.append(("collect", self.name, None, handle.shape[0]))
        return super().collect(handle)


def _engines(tiny_hf, arch: str, min_seqs: int, log: list | None = None) -> tuple[Engine, Engine]:
    path, _ = tiny_hf(arch)
    plain = Engine.load(path, kv_blocks=64, block_size=4)
    split = Engine.load(path, kv_blocks=64, block_size=4)
    bank = split.dispatch.bank
    if log is not None:
        split.dispatch = Recording(bank, "A", log)
    split.micro = MicroBatching(Recording(bank, "B", log) if log is not None else LocalDispatch(bank), min_seqs)
    return plain, split


def test_halves_take_turns_per_moe_layer(tiny_hf):
    log: list = []
    _, engine = _engines(tiny_hf, "mixtral", 2, log)
    engine.step([SequenceWork(f"s{i}", [3 + i, 4, 5], 0, SamplingParams(max_tokens=4)) for i in range(4)])
    # 2 MoE layers (0, 1); A = 2 sequences x 3 tokens, B the same; B's layer-0 experts are out while A's
    # layer-0 result is collected and A's layer 1 runs up to its submit.
    assert log == [("submit", "A", 0, 6), ("submit", "B", 0, 6), ("collect", "A", None, 6),
                   ("submit", "A", 1, 6), ("collect", "B", None, 6), ("submit", "B", 1, 6),
                   ("collect", "A", None, 6), ("collect", "B", None, 6)]
    assert engine.micro.steps == 1


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral"])  # qwen2_moe: shared expert + sigmoid gate, dense layer 0
def test_split_steps_keep_logits_and_greedy_tokens(tiny_hf, arch):
    plain, split = _engines(tiny_hf, arch, 3)
    sampling = SamplingParams(max_tokens=64)
    prompts = {f"s{i}": [3 + (i * 7 + j) % 200 for j in range(2 + 3 * i)] for i in range(6)}
    long = [5 + j % 100 for j in range(21)]  # a prompt fed in two chunks while the others decode
    steps = [[SequenceWork(s, p, 0, sampling) for s, p in prompts.items()]
             + [SequenceWork("long", long[:12], 0, sampling, sample=False)]]
    tokens = {e: {} for e in ("plain", "split")}
    for n in range(6):
        for name, engine in (("plain", plain), ("split", split)):
            works = steps[0] if n == 0 else _next(engine, tokens[name], n, long)
            results, logits = engine.step_with_logits(works)
            tokens[name][n] = [(r.seq_id, r.token_id) for r in results]
            if name == "plain":
                want = logits
            else:
                torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)
        assert tokens["split"][n] == tokens["plain"][n]
    assert split.micro.steps == 6 and split.cached_length("long") == 21 + 4


def _next(engine: Engine, last: dict, n: int, long: list[int]) -> list[SequenceWork]:
    """Decode works for every sequence that sampled in step n-1; the long prompt's second chunk in step 1."""
    works = [SequenceWork(seq, [tok], engine.cached_length(seq), None) for seq, tok in last[n - 1] if tok is not None]
    if n == 1:
        works.insert(2, SequenceWork("long", long[12:], 12, None))  # the chunk lands in the middle of half A
    return works
