"""Expert load counters on the tiny MoE: exact per-(layer, expert) counts of what the gates chose, unused slots
ignored, one counter set per backbone, nothing for a dense model."""

from __future__ import annotations

from collections import Counter

import torch

from moemesh.runtime.backbone import MoeBlock
from moemesh.runtime.engine import Engine
from moemesh.runtime.expert_load import ExpertLoad, count
from moemesh.runtime.types import SequenceWork

PROMPT = [1, 9690, 314, 253, 1345, 30, 2045, 28, 198, 4161, 2]


def test_counts_equal_the_gates_choices_over_prefill_and_decode(tiny_moe_dir):
    engine = Engine.load(tiny_moe_dir, kv_blocks=8, block_size=16)
    load = ExpertLoad.attach(engine.backbone)
    assert ExpertLoad.attach(engine.backbone) is load  # idempotent: the servicer and tests share one
    chosen: Counter = Counter()

    def remember(block: MoeBlock):  # the reference: what the gate returned, counted on the host
        def hook(_module, _inputs, output):
            chosen.update((block.layer, e) for e in output[0].reshape(-1).tolist())
        return hook

    for block in (m for m in engine.backbone.modules() if isinstance(m, MoeBlock)):
        block.gate.register_forward_hook(remember(block))
    token = engine.step([SequenceWork("a", PROMPT, 0), SequenceWork("b", PROMPT[:4], 0)])[0].token_id
    engine.step([SequenceWork("a", [token], len(PROMPT))])
    counts = load.snapshot()
    assert sorted(counts) == [0, 1]  # the tiny MoE's two MoE layers
    assert counts == {layer: [chosen[(layer, e)] for e in range(4)] for layer in (0, 1)}
    tokens = len(PROMPT) + 4 + 1
    assert all(sum(per_expert) == tokens * 2 for per_expert in counts.values())  # top-2: each token twice


def test_unused_slots_are_not_counted():
    load = ExpertLoad(num_layers=3, num_experts=4, moe_layers=(1, 2), device="cpu")
    count(load.counts[1], torch.tensor([[0, 3], [3, -1], [-1, -1]]))
    count(load.counts[2], torch.tensor([[2, 2]]))
    count(load.counts[1], torch.tensor([[3, 1]]))
    assert load.snapshot() == {1: [1, 1, 0, 3], 2: [0, 0, 2, 0]}


def test_a_dense_model_has_no_counters(builtin_dense_dir):
    from moemesh.runtime.backbone import Backbone
    from moemesh.runtime.checkpoint import Checkpoint
    from moemesh.runtime.spec import load_spec

    spec = load_spec(builtin_dense_dir)
    with Checkpoint(builtin_dense_dir) as ckpt:
        backbone = Backbone.load(ckpt, spec, "cpu", torch.float32)
    assert ExpertLoad.attach(backbone) is None
