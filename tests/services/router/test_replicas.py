"""Expert replicas from a placement file, with real shard processes (tiny MoE, 4 experts, top-2): expert 2 on both
shards, its tokens split between them; the logits equal the in-process engine's (which the unreplicated shm and
gRPC placements also match: test_shm_transport.py), over shared memory, gloo and gRPC; a per-layer file (other
experts and replicas in each layer, shards started with --placement) too; shards that do not match the file, or a
file leaving an expert out, refuse to start naming the shard and the experts."""

from __future__ import annotations

import pytest
import torch

from moemesh.runtime import placement_plan
from moemesh.runtime.engine import Engine
from services.router.__main__ import build_router
from services.router.placement import PlacementError
from tests.services.router.test_shm_transport import BLOCK, KV_BLOCKS, PROMPT, Shard, config

REPLICATED = [[0, 1, 2], [2, 3]]  # expert 2 on both shards


@pytest.fixture(scope="module")
def shards(tiny_moe_dir, tmp_path_factory):
    home = tmp_path_factory.mktemp("replica-home")
    procs = [Shard(tiny_moe_dir, i, home, experts).start() for i, experts in enumerate(REPLICATED)]
    yield procs
    for shard in procs:
        shard.stop()


@pytest.fixture(scope="module")
def placement_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("placement") / "placement.json"
    placement_plan.write(path, REPLICATED, 4, "test", {0: [1.0, 1.0, 4.0, 1.0], 1: [1.0, 1.0, 4.0, 1.0]})
    return path


def _logits(router, batches):
    return [router.worker.call(router.engine.forward_logits, b) for b in batches]


@pytest.mark.parametrize("transport", ["shm", "grpc", "dist"])
def test_replicas_keep_the_logits(shards, placement_file, tiny_moe_dir, transport):
    batches = ([PROMPT], [PROMPT * 3, PROMPT[:4]])  # 11 tokens, then 33 + 4: both replicas of expert 2 get tokens
    local = Engine.load(tiny_moe_dir, kv_blocks=KV_BLOCKS, block_size=BLOCK)
    router = build_router(config(tiny_moe_dir, [s.address for s in shards], expert_transport=transport,
                                 placement=str(placement_file)))
    try:
        assert router.dispatch.transports() == [{"dist": "gloo"}.get(transport, transport)] * 2
        split = router.dispatch.split
        assert split is not None
        # The split itself: expert 2's slots alternate between the shards, the others keep their only owner.
        ids = torch.tensor([[2, 0], [2, 3], [2, 1], [3, -1]])
        assigned = split.assign(0, ids)
        first = assigned[:3, 0].tolist()
        assert first in ([0, 1, 0], [1, 0, 1]) and split.assign(0, ids)[:3, 0].tolist() == [1 - s for s in first]
        assert assigned[:, 1].tolist() == [0, 1, 0, -1] and assigned[3, 0] == 1
        got = _logits(router, batches)
    finally:
        router.close()
    for remote, batch in zip(got, batches):
        for a, b in zip(remote, local.forward_logits(batch)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_shards_not_matching_the_file_refuse_to_start(shards, tiny_moe_dir, tmp_path):
    swapped = tmp_path / "swapped.json"
    placement_plan.write(swapped, [[2, 3], [0, 1, 2]], 4, "test", {0: [1.0] * 4})
    with pytest.raises(PlacementError, match=rf"{shards[0].address} hosts experts 0-2, the file says 2-3"):
        build_router(config(tiny_moe_dir, [s.address for s in shards], placement=str(swapped)))
    # Without the file, the same shards are an undeclared duplicate: refused, naming the expert.
    with pytest.raises(PlacementError, match="more than one shard: layer 0: experts 2"):
        build_router(config(tiny_moe_dir, [s.address for s in shards]))


def test_a_file_that_leaves_an_expert_out_is_refused(tmp_path):
    path = tmp_path / "gap.json"
    path.write_text('{"version": 1, "num_experts": 4, "shards": [[0, 1], [1, 3]]}')
    with pytest.raises(placement_plan.PlacementFileError, match=r"experts \[2\] are hosted by no shard"):
        placement_plan.read(path)


@pytest.mark.slow
def test_a_per_layer_placement_keeps_the_logits(tiny_moe_dir, tmp_path):
    per_layer = {0: [[0, 1, 2], [2, 3]], 1: [[1, 3], [0, 2, 3]]}  # expert 2 twice in layer 0, expert 3 in layer 1
    path = tmp_path / "per-layer.json"
    union = placement_plan.union(per_layer)
    assert union == [[0, 1, 2, 3], [0, 2, 3]]
    placement_plan.write(path, union, 4, "test", {0: [1.0] * 4, 1: [1.0] * 4}, per_layer)
    procs = [Shard(tiny_moe_dir, i, tmp_path, experts, ("--placement", str(path))).start()
             for i, experts in enumerate(union)]
    try:
        router = build_router(config(tiny_moe_dir, [s.address for s in procs], placement=str(path)))
        try:
            assert router.dispatch.transports() == ["shm", "shm"]
            got = _logits(router, ([PROMPT * 3, PROMPT[:4]],))[0]
        finally:
            router.close()
    finally:
        for shard in procs:
            shard.stop()
    local = Engine.load(tiny_moe_dir, kv_blocks=KV_BLOCKS, block_size=BLOCK)
    for a, b in zip(got, local.forward_logits([PROMPT * 3, PROMPT[:4]])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
