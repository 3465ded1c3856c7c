"""MergedCompute (M:N): blocks of several routers waiting at once run as one expert batch with the same outputs as
alone; other layers and a bad block stay apart; a lone block runs in place. Real ExpertBank of the tiny MoE."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from moemesh.runtime.experts import ExpertBank
from services.expert.merged_compute import MergedCompute
from services.expert.shard import ExpertShard, InvalidTensor

H = 64  # tiny MoE hidden size


class CountingBank:
    """The real bank, counting the token rows of each forward it runs."""

    def __init__(self, bank: ExpertBank) -> None:
        self.bank, self.calls = bank, []
        self.layers, self.experts, self.weight_bytes = bank.layers, bank.experts, bank.weight_bytes

    def forward(self, layer, hidden, topk_ids, topk_weights, out=None):
        self.calls.append((layer, hidden.shape[0]))
        return self.bank.forward(layer, hidden, topk_ids, topk_weights, out=out)


@pytest.fixture(scope="module")
def bank(tiny_moe_dir):
    return ExpertBank.load(tiny_moe_dir)


def _shard(bank) -> tuple[ExpertShard, CountingBank]:
    counting = CountingBank(bank)
    shard = ExpertShard(counting, hidden_size=H, num_experts=4, dtype=torch.float32, device=torch.device("cpu"))
    return shard, counting


def _block(seed: int, tokens: int):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, H, generator=g)
    ids = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(tokens)]).to(torch.int32)  # [T, 2]
    weights = torch.softmax(torch.randn(tokens, 2, generator=g), -1)
    return hidden, ids, weights, torch.empty(tokens, H)


def _submit_while_busy(compute: MergedCompute, jobs: list[tuple]) -> list[BaseException | None]:
    """Submits every job from its own thread while the shard is busy (its turn lock held), so that all wait at
    once; returns each job's error (None: ok)."""
    errors: list[BaseException | None] = [None] * len(jobs)

    def run(i: int, layer: int, block: tuple) -> None:
        try:
            compute.forward(layer, *block)
        except BaseException as exc:  # noqa: BLE001
            errors[i] = exc

    with compute._turn:
        threads = [threading.Thread(target=run, args=(i, *job)) for i, job in enumerate(jobs)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while len(compute._pending) < len(jobs) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(compute._pending) == len(jobs)
    for t in threads:
        t.join(10)
    return errors


def test_same_layer_blocks_of_two_routers_run_as_one_batch_with_the_outputs_of_each_alone(bank):
    shard, counting = _shard(bank)
    compute = MergedCompute(shard)
    a, b, other = _block(0, 3), _block(1, 5), _block(2, 2)
    errors = _submit_while_busy(compute, [(0, a), (0, b), (1, other)])
    assert errors == [None, None, None]
    assert sorted(counting.calls) == [(0, 8), (1, 2)]  # layer 0: 3 + 5 rows in one forward; layer 1 apart
    assert compute.merged_blocks == 2
    for layer, (hidden, ids, weights, out) in ((0, a), (0, b), (1, other)):
        torch.testing.assert_close(out, bank.forward(layer, hidden, ids, weights), rtol=1e-5, atol=1e-6)


def test_a_bad_block_fails_alone_and_a_lone_block_runs_in_place(bank):
    shard, counting = _shard(bank)
    compute = MergedCompute(shard)
    good = _block(3, 4)
    bad = (torch.randn(2, H + 1), *_block(4, 2)[1:])  # wrong hidden size
    errors = _submit_while_busy(compute, [(0, good), (0, bad)])
    assert errors[0] is None and isinstance(errors[1], InvalidTensor) and "hidden" in str(errors[1])
    torch.testing.assert_close(good[3], bank.forward(0, *good[:3]), rtol=1e-5, atol=1e-6)
    counting.calls.clear()
    hidden, ids, weights, out = _block(5, 6)
    assert compute.forward(1, hidden, ids, weights, out) >= 0.0
    assert counting.calls == [(1, 6)]
    torch.testing.assert_close(out, bank.forward(1, hidden, ids, weights), rtol=1e-5, atol=1e-6)
